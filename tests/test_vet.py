"""The report card: the question-level split, separation statistics, warnings and files."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.errors import PertokenError
from pertoken.pipeline.extract import extract_vectors
from pertoken.pipeline.generate import generate_csv
from pertoken.pipeline.options import Generation
from pertoken.pipeline.summaries import load_summaries
from pertoken.pipeline.vet import stats as st
from pertoken.pipeline.vet.stage import vet_vector
from pertoken.traits import load_trait
from pertoken.vectors import PersonaVector, load_vector, save_vector
from tests.pipeline_fakes import RecordingBackend
from tests.small_kit import write_kit


def _score(path, trait, score):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r[trait], r["coherence"] = score, "90"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def make_run(folder, *, n_questions=4, backend=None):
    """Judged pos/neg CSVs (every pair kept) and extracted vectors of the fake backend."""
    folder.mkdir(parents=True, exist_ok=True)
    kit = load_trait(write_kit(folder, "evil", n_questions=n_questions, n_instructions=2))
    fake = backend or RecordingBackend()
    csvs = {p: folder / f"{p}.csv" for p in ("pos", "neg")}
    for pol, path in csvs.items():
        generate_csv(fake, kit, path, Generation(samples=2), polarity=pol, progress=False)
        _score(path, "evil", "90" if pol == "pos" else "5")
    paths = extract_vectors(
        fake, pos_csv=csvs["pos"], neg_csv=csvs["neg"], trait="evil", save_dir=folder / "v"
    )
    return fake, csvs, paths


class CountingBackend(RecordingBackend):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.summary_calls = 0

    def summaries(self, prompts, answers, *, batch_size=8):
        self.summary_calls += 1
        return super().summaries(prompts, answers, batch_size=batch_size)


def test_split_holds_out_whole_questions():
    question = np.repeat(np.arange(10), 6)  # 10 questions, 6 samples each
    train, test = st.question_split(question, holdout=0.3, seed=3)
    held, kept = set(question[test]), set(question[train])
    assert held.isdisjoint(kept) and held | kept == set(range(10))
    assert len(held) == 3 and len(test) == 18
    again = st.question_split(question, holdout=0.3, seed=3)
    assert np.array_equal(again[1], test)  # seeded
    with pytest.raises(PertokenError, match="at least 2"):
        st.question_split(np.zeros(8, int))
    with pytest.raises(PertokenError, match="between 0 and 1"):
        st.question_split(question, holdout=1.5)


def test_constant_scores_separate_nothing():
    label = np.r_[np.ones(5), np.zeros(5)].astype(int)
    assert st.separation(np.zeros(10), label) == (0.5, 0.0)
    auroc, d = st.separation(np.r_[np.ones(5), np.zeros(5)], label)
    assert auroc == 1.0 and d == float("inf")  # two constants: perfectly apart
    # identical states on both sides: no direction at all, so AUROC 0.5 and d 0 on every row
    rng = np.random.default_rng(0)
    same = np.tile(rng.normal(size=(4, 3, 8)), (2, 1, 1)).astype(np.float16)  # [8, 3, 8]
    label = np.r_[np.ones(4), np.zeros(4)].astype(int)
    train, test = np.array([0, 1, 4, 5]), np.array([2, 3, 6, 7])
    for method in ("mean_diff", "probe"):
        auroc, d = st.heldout_separation(
            same, label, train, test, method=method, h_norm=st.mean_norms(same)
        )
        assert auroc.tolist() == [0.5] * 3 and d.tolist() == [0.0] * 3


def test_coefficients_put_the_ratio_where_asked():
    v, h = np.array([0.5, 2.0, 0.0]), np.array([1.0, 10.0, 3.0])
    coefs = st.coefs_at(v, h)
    for ratio, cs in coefs.items():
        assert [c * vn / hn for c, vn, hn in zip(cs[:2], v, h)] == pytest.approx([ratio] * 2)
        assert cs[2] is None  # a zero row has no coefficient


def test_massive_dimensions_are_named():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(20, 3, 64)).astype(np.float32)
    states[:, 2, 7] += 200.0  # row 2: dimension 7 holds almost all of |h|^2
    found = st.massive_dims(states)
    assert list(found) == [2] and found[2][0][0] == 7 and found[2][0][1] > 0.9


def test_report_files_and_reuse_of_the_summaries(tmp_path):
    fake, csvs, paths = make_run(tmp_path)
    other = save_vector(PersonaVector(np.ones((5, 16), np.float32)), tmp_path / "v" / "kind.pt")
    counting = CountingBackend()
    r = vet_vector(
        paths["response_avg"],
        pos_csv=csvs["pos"],
        neg_csv=csvs["neg"],
        backend=counting,
        model="org/fake-chat-1b",
    )
    assert counting.summary_calls == 0  # extract's summaries are reused: no model run
    assert r.trait == "evil" and r.pairs == 16 and len(r.rows) == 5
    assert set(r.split["held_out_questions"]).isdisjoint(r.split["train_questions"])
    assert len(r.split["held_out_questions"]) == 2  # 30% of 4 questions, rounded up
    assert r.suggested_row in r.middle_rows == [2, 3]
    v = load_vector(paths["response_avg"]).data
    assert r.rows[2].v_norm == pytest.approx(np.linalg.norm(v[2]), rel=1e-5)
    assert r.rows[2].coef["1"] * r.rows[2].v_norm == pytest.approx(r.rows[2].h_norm)
    cos = r.other_vectors["kind"][3]
    assert cos == pytest.approx(v[3].sum() / (np.linalg.norm(v[3]) * 4), rel=1e-4)
    assert "evil_prompt_avg_diff" in r.other_vectors and other.is_file()
    files = {ext: tmp_path / "v" / f"evil_report.{ext}" for ext in ("json", "md", "png")}
    data = json.loads(files["json"].read_text())  # strict JSON: no NaN or Infinity
    assert data["suggested_row"] == r.suggested_row and len(data["rows"]) == 5
    md = files["md"].read_text()
    assert f"suggested layer {r.suggested_row}" in md and md.count("\n| ") >= 5 + 5
    assert files["png"].read_bytes()[:4] == b"\x89PNG"


def test_stale_summaries_are_recomputed_with_the_model(tmp_path):
    fake, csvs, paths = make_run(tmp_path)
    with open(csvs["pos"], newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["answer"] = ""
    with open(csvs["pos"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    counting = CountingBackend()
    r = vet_vector(
        paths["response_avg"], pos_csv=csvs["pos"], neg_csv=csvs["neg"], backend=lambda: counting
    )
    assert counting.summary_calls > 0 and r.pairs == 15
    assert len(load_summaries(tmp_path / "v" / "evil_summaries.npz").label) == 30


def test_too_few_pairs_is_a_clear_error(tmp_path):
    fake, csvs, paths = make_run(tmp_path, n_questions=1)
    with pytest.raises(PertokenError, match="from 1 question.*at least 2"):
        vet_vector(paths["response_avg"], pos_csv=csvs["pos"], neg_csv=csvs["neg"])
    fake, csvs, paths = make_run(tmp_path / "b", n_questions=2)
    _score(csvs["neg"], "evil", "5")
    with open(csvs["pos"], newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows[1:4]:
        r["evil"] = "10"  # question 0 keeps one pair of four
    with open(csvs["pos"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(PertokenError, match="too few kept pairs"):
        vet_vector(
            paths["response_avg"],
            pos_csv=csvs["pos"],
            neg_csv=csvs["neg"],
            backend=RecordingBackend(),
        )


def test_vector_from_another_model_is_a_clear_error(tmp_path):
    fake, csvs, paths = make_run(tmp_path)
    wrong = save_vector(
        PersonaVector(np.ones((5, 32), np.float32), {"trait": "evil"}), tmp_path / "v" / "w.pt"
    )
    with pytest.raises(PertokenError, match=r"\[5, 32\].*another model"):
        vet_vector(wrong, pos_csv=csvs["pos"], neg_csv=csvs["neg"])  # summaries beside it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = save_vector(load_vector(wrong), elsewhere / "evil_response_avg_diff.pt")
    with pytest.raises(PertokenError, match=r"\[5, 32\].*another model"):
        vet_vector(moved, pos_csv=csvs["pos"], neg_csv=csvs["neg"], backend=RecordingBackend())


def test_cli_vet_prints_the_suggestion_and_one_line_errors(tmp_path, llama_dir):
    fake, csvs, paths = make_run(tmp_path)
    pos_neg = ["--pos", str(csvs["pos"]), "--neg", str(csvs["neg"])]
    out = ["--out", str(tmp_path / "rep")]
    args = ["vet", str(paths["response_avg"]), "--model", "org/fake-chat-1b", *pos_neg, *out]
    # separation only (--no-causal) and the summaries exist: the model is never loaded
    r = CliRunner().invoke(main, [*args, "--no-causal"])
    assert r.exit_code == 0, r.output
    assert "suggested layer" in r.output and (tmp_path / "rep" / "evil_report.md").is_file()
    wrong = save_vector(PersonaVector(np.zeros((5, 32), np.float32)), tmp_path / "x.pt")
    args = ["vet", str(wrong), "--model", str(llama_dir), "--backend", "torch", "--trait", "evil"]
    args += pos_neg
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "error:" in r.output and "[5, 64]" in r.output
    assert "Traceback" not in r.output


def _summaries(separated_rows, *, pairs=12, rows=5, hidden=16):
    """Pos and neg samples alike except a shift on `separated_rows`; 4 questions."""
    from pertoken.pipeline.summaries import from_pairs

    rng = np.random.default_rng(0)
    base = rng.normal(size=(pairs, rows, hidden))
    pos = base.copy()
    pos[:, separated_rows] += 3.0 * rng.normal(size=hidden)
    keys = [(p % 4, 0, p // 4) for p in range(pairs)]
    return from_pairs(keys, {"response_avg": pos}, {"response_avg": base}, {"model": "m"})


@pytest.mark.parametrize(
    "shifted, says",
    [([1, 2, 3, 4], "carries the instruction text"), ([0, 1, 2, 3, 4], "wording"), ([2, 3], None)],
)
def test_early_rows_warning_tells_instruction_text_from_wording(tmp_path, shifted, says):
    from pertoken.pipeline.vet.stage import build_report

    s = _summaries(shifted)
    x = s.states["response_avg"].astype(np.float64)
    vec = PersonaVector((x[s.label == 1].mean(0) - x[s.label == 0].mean(0)).astype(np.float32))
    r = build_report(
        vec, s, path=tmp_path / "v.pt", trait="t", kind="response_avg", method="mean_diff"
    )
    early = [w for w in r.warnings if "as well as the middle rows" in w]
    assert r.suggested_row in (2, 3) and r.rows[r.suggested_row].auroc == 1.0
    if says is None:
        assert early == [] and r.rows[1].auroc == 0.5
    else:
        assert len(early) == 1 and says in early[0]
