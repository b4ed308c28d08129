"""Extraction: pairing and filtering per docs/CONVENTIONS.md, vectors against a plain reference."""

import csv
import json
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.errors import PertokenError
from pertoken.pipeline.extract import KINDS, extract_vectors
from pertoken.pipeline.generate import generate_csv
from pertoken.pipeline.options import Extraction, Generation
from pertoken.traits import load_trait
from pertoken.vectors import load_vector
from tests.pipeline_fakes import RecordingBackend
from tests.reference import reference_summaries
from tests.small_kit import write_kit


@pytest.fixture(autouse=True)
def one_thread(torch_one_thread):
    yield


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def set_scores(path, trait, scores, *, shuffle=False):
    """scores: one (trait, coherence) pair per row, None for a missing score."""
    rows = rows_of(path)
    for r, (s, c) in zip(rows, scores):
        r[trait] = "" if s is None else str(s)
        r["coherence"] = "" if c is None else str(c)
    if shuffle:
        random.Random(0).shuffle(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def judged(tmp_path):
    """pos/neg CSVs of 8 rows each from the fake backend, scored so rows 0, 3, 6 pass at T=50."""
    kit = load_trait(write_kit(tmp_path, "evil"))
    fake = RecordingBackend()
    pos, neg = tmp_path / "pos.csv", tmp_path / "neg.csv"
    for pol, path in (("pos", pos), ("neg", neg)):
        generate_csv(fake, kit, path, Generation(samples=2), polarity=pol, progress=False)
    set_scores(
        pos,
        "evil",
        [(50, 50), (49.9, 90), (90, None), (80, 80), (80, 80), (None, 80), (100, 99), (70, 70)],
    )
    set_scores(
        neg,
        "evil",
        [(49.9, 60), (0, 90), (0, 90), (10, 50), (50, 90), (0, 90), (0, 80), (0, 49)],
        shuffle=True,
    )  # pairing is by (i, k, j)
    return fake, pos, neg


def test_pairs_filter_and_mean_difference(tmp_path, judged):
    fake, pos, neg = judged
    paths = extract_vectors(fake, pos_csv=pos, neg_csv=neg, trait="evil", save_dir=tmp_path / "v")
    assert {k: p.name for k, p in paths.items()} == {k: f"evil_{k}_diff.pt" for k in KINDS}
    p_rows = rows_of(pos)
    n_rows = {r["question_id"].replace("_neg_", "_pos_") + r["sample"]: r for r in rows_of(neg)}
    kept_p = [p_rows[n] for n in (0, 3, 6)]
    kept_n = [n_rows[r["question_id"] + r["sample"]] for r in kept_p]
    sp = fake.summaries([r["prompt"] for r in kept_p], [r["answer"] for r in kept_p])
    sn = fake.summaries([r["prompt"] for r in kept_n], [r["answer"] for r in kept_n])
    for kind, path in paths.items():
        v = load_vector(path)
        want = getattr(sp, kind).mean(0) - getattr(sn, kind).mean(0)
        assert v.data.dtype == np.float32 and v.data.shape == (5, 16)
        np.testing.assert_allclose(v.data, want, rtol=1e-5, atol=1e-6)
        assert torch.load(path, weights_only=True).dtype == torch.float32
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["pairs_kept"] == 3 and meta["pairs_total"] == 8 and meta["threshold"] == 50
        assert (
            meta["model"] == "org/fake-chat-1b"
            and meta["backend"] == "fake"
            and meta["trait"] == "evil"
        )
        for key in ("dtype", "judge_model", "pertoken_version", "created"):
            assert key in meta


def test_threshold_changes_what_is_kept(tmp_path, judged):
    fake, pos, neg = judged
    paths = extract_vectors(
        fake,
        pos_csv=pos,
        neg_csv=neg,
        trait="evil",
        save_dir=tmp_path / "v",
        extraction=Extraction(threshold=80),
    )
    meta = json.loads(paths["prompt_avg"].with_suffix(".json").read_text())
    assert meta["pairs_kept"] == 2  # rows 3 and 6: pos >= 80, neg < 20


def test_too_few_pairs_shows_distribution(tmp_path, judged):
    fake, pos, neg = judged
    with pytest.raises(PertokenError) as e:
        extract_vectors(
            fake,
            pos_csv=pos,
            neg_csv=neg,
            trait="evil",
            save_dir=tmp_path / "v",
            extraction=Extraction(min_pairs=4),
        )
    msg = str(e.value)
    assert "only 3 of 8 pairs pass threshold 50" in msg and "p10/50/90" in msg
    assert "1 missing" in msg and "--threshold" in msg and "--n-per-question" in msg
    assert not (tmp_path / "v").exists()


def test_mismatched_csvs_are_errors(tmp_path, judged):
    fake, pos, neg = judged
    kw = dict(trait="evil", save_dir=tmp_path / "v")
    with pytest.raises(PertokenError, match="neg rows where pos rows belong"):
        extract_vectors(fake, pos_csv=neg, neg_csv=pos, **kw)
    short = tmp_path / "short.csv"
    rows = rows_of(neg)[:-1]
    with open(short, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(PertokenError, match="do not pair up"):
        extract_vectors(fake, pos_csv=pos, neg_csv=short, **kw)
    with pytest.raises(PertokenError, match="no 'kind' column"):
        extract_vectors(fake, pos_csv=pos, neg_csv=neg, trait="kind", save_dir=tmp_path / "v")
    with pytest.raises(PertokenError, match="does not exist"):
        extract_vectors(fake, pos_csv=tmp_path / "nope.csv", neg_csv=neg, **kw)


def test_tiny_model_matches_plain_reference(tmp_path, model_dir):
    """CLI extract == one sample at a time through transformers' output_hidden_states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pertoken.backends import load_backend

    kit = load_trait(write_kit(tmp_path, "evil", n_questions=2, n_instructions=2))
    backend = load_backend(str(model_dir), "torch", dtype="float32", device="cpu")
    pos, neg = tmp_path / "pos.csv", tmp_path / "neg.csv"
    for pol, path in (("pos", pos), ("neg", neg)):
        generate_csv(
            backend, kit, path, Generation(samples=2, max_tokens=6), polarity=pol, progress=False
        )
    scores = [(90, 90), (90, 90), (10, 90), (90, 90), (90, 90), (90, 10), (90, 90), (90, 90)]
    set_scores(pos, "evil", scores)
    set_scores(neg, "evil", [(10, 90)] * 8)
    kept = [n for n, (s, c) in enumerate(scores) if s >= 50 and c >= 50]
    args = [
        "extract",
        "--model",
        str(model_dir),
        "--backend",
        "torch",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--pos",
        str(pos),
        "--neg",
        str(neg),
        "--trait",
        "evil",
        "--save-dir",
        str(tmp_path / "v"),
        "--batch-size",
        "3",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def mean_ref(path):
        rows = [rows_of(path)[n] for n in kept]
        per = [reference_summaries(model, tok, r["prompt"], r["answer"]) for r in rows]
        return {
            k: np.mean([p[n] for p in per], axis=0)
            for n, k in enumerate(("prompt_avg", "prompt_last", "response_avg"))
        }

    ref_p, ref_n = mean_ref(pos), mean_ref(neg)
    for kind in KINDS:
        v = load_vector(tmp_path / "v" / f"evil_{kind}_diff.pt")
        np.testing.assert_allclose(v.data, ref_p[kind] - ref_n[kind], rtol=1e-4, atol=1e-5)
        assert v.meta["pairs_kept"] == len(kept) == 6


def test_empty_answer_is_never_kept(tmp_path, judged):
    fake, pos, neg = judged
    rows = rows_of(pos)
    rows[3]["answer"] = ""  # a pair that passes on scores, but has no answer tokens
    with open(pos, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths = extract_vectors(fake, pos_csv=pos, neg_csv=neg, trait="evil", save_dir=tmp_path / "v")
    v = load_vector(paths["response_avg"])
    assert v.meta["pairs_kept"] == 2 and np.isfinite(v.data).all()


def test_per_sample_summaries_are_kept_in_float16(tmp_path, judged):
    from pertoken.pipeline.summaries import load_summaries

    fake, pos, neg = judged
    extract_vectors(fake, pos_csv=pos, neg_csv=neg, trait="evil", save_dir=tmp_path / "v")
    s = load_summaries(tmp_path / "v" / "evil_summaries.npz")
    assert set(s.states) == {"response_avg"}
    assert s.states["response_avg"].dtype == np.float16
    assert s.states["response_avg"].shape == (6, 5, 16)  # 3 kept pairs, pos then neg
    assert s.label.tolist() == [1, 1, 1, 0, 0, 0]
    # rows 0, 3, 6 of the pos CSV are kept: (question, instruction, sample) of each
    kept = [rows_of(pos)[n] for n in (0, 3, 6)]
    keys = [
        (int(r["question_id"].split("_")[1]), int(r["question_id"].split("_")[3]), int(r["sample"]))
        for r in kept
    ]
    assert sorted(s.pair_keys) == sorted(keys)
    assert s.question.tolist() == [k[0] for k in s.pair_keys] * 2
    # the states are the samples' own response_avg, pos then neg in pair order
    by_key = {k: r for k, r in zip(keys, kept)}
    first = by_key[s.pair_keys[0]]
    want = fake.summaries([first["prompt"]], [first["answer"]]).response_avg[0]
    np.testing.assert_allclose(s.states["response_avg"][0], want, rtol=2e-3, atol=2e-3)
    assert s.meta["model"] == "org/fake-chat-1b" and s.meta["threshold"] == 50


def test_probe_method_adds_a_probe_vector(tmp_path, judged):
    fake, pos, neg = judged
    paths = extract_vectors(
        fake,
        pos_csv=pos,
        neg_csv=neg,
        trait="evil",
        save_dir=tmp_path / "v",
        extraction=Extraction(method="probe"),
    )
    assert paths["probe"].name == "evil_response_avg_probe.pt"
    probe, diff = load_vector(paths["probe"]), load_vector(paths["response_avg"])
    assert probe.data.shape == diff.data.shape and probe.data.dtype == np.float32
    assert probe.meta["method"] == "probe" and probe.meta["kind"] == "response_avg"
    assert diff.meta["method"] == "mean_diff" and probe.meta["pairs_kept"] == 3
    assert torch.load(paths["probe"], weights_only=True).shape == (5, 16)
    with pytest.raises(PertokenError, match="unknown method 'pca'"):
        extract_vectors(
            fake,
            pos_csv=pos,
            neg_csv=neg,
            trait="evil",
            save_dir=tmp_path / "w",
            extraction=Extraction(method="pca"),
        )
