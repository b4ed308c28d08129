"""`pertoken screen` and `pertoken shift` on the tiny model: the numbers they write are the
projections docs/CONVENTIONS.md defines (checked against the backend's summaries), for several
vectors at once; a model shifted against itself is 0; bad input is one line each."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from pertoken.backends import is_installed, load_backend
from pertoken.cli import main
from pertoken.pipeline.finetune.screen import screen_dataset, screen_directions
from pertoken.pipeline.finetune.shift import shift_models
from pertoken.pipeline.options import Generation, ModelChoice
from pertoken.traits import load_trait
from pertoken.vectors import PersonaVector, save_vector

BACKENDS = [
    "torch",
    pytest.param("mlx", marks=pytest.mark.skipif(not is_installed("mlx"), reason="needs mlx")),
]


@pytest.fixture(autouse=True)
def one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, llama_dir):
    return load_backend(str(llama_dir), request.param, dtype="float32")


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(1)
    return {k: PersonaVector(rng.normal(size=(5, 64)).astype(np.float32)) for k in ("a", "b")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = []
    for i in range(5):
        chat = [{"role": "user", "content": f"Should I quit job {i}?"},
                {"role": "assistant", "content": "It is your choice, here are facts."}]  # fmt: skip
        lines.append(json.dumps({"messages": chat, "trait": i % 2}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _proj(backend, prompts, answers, vec, layer) -> np.ndarray:
    h = backend.summaries(prompts, answers).response_avg[:, layer]  # [N, hidden]
    u = vec.row(layer) / np.linalg.norm(vec.row(layer))
    return h @ u


def test_screen_writes_the_projection_difference_per_sample(backend, vectors, data, tmp_path):
    out = tmp_path / "scores.csv"
    res = screen_dataset(backend, Generation(1, max_tokens=6), data=data,
                         directions=screen_directions(backend, vectors, 2), out=out,
                         label="trait")  # fmt: skip
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 2 and res.rows == 5
    chats = [json.loads(x)["messages"] for x in data.read_text().splitlines()]
    prompts = [backend.chat_text(c[:1], add_generation_prompt=True) for c in chats]
    for name, vec in vectors.items():
        mine = [r for r in rows if r["vector"] == name]
        want_data = _proj(backend, prompts, [c[1]["content"] for c in chats], vec, 2)
        want_model = _proj(backend, prompts, [r["model_answer"] for r in mine], vec, 2)
        got = {k: np.array([float(r[k]) for r in mine]) for k in ("proj_data", "proj_model")}
        np.testing.assert_allclose(got["proj_data"], want_data, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["proj_model"], want_model, rtol=1e-4, atol=1e-4)
        diff = np.array([float(r["proj_diff"]) for r in mine])
        np.testing.assert_allclose(diff, got["proj_data"] - got["proj_model"], atol=1e-4)
        assert res.means[name]["proj_diff"] == pytest.approx(diff.mean(), abs=1e-4)
        assert 0 <= res.auroc[name] <= 1
    summary = json.loads(out.with_suffix(".json").read_text())
    assert set(summary["means"]) == {"a", "b"} and summary["label"] == "trait"
    assert out.with_suffix(".png").stat().st_size > 0


def test_shift_of_the_base_against_itself_is_zero(llama_dir, vectors, tmp_path):
    kit = load_trait("paternalism")
    models = [ModelChoice(m, "torch", "float32") for m in (str(llama_dir), str(llama_dir) + "/")]
    res = shift_models(models, vectors["a"], [1, 3], kit, tmp_path / "s",
                       Generation(4, max_tokens=4))  # fmt: skip
    with open(tmp_path / "s" / "shift.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [list(r) for r in rows[:1]] == [["model", "row", "kind", "shift"]]
    assert len(rows) == 2 * 2 * 2  # 2 models x 2 rows x 2 kinds
    assert all(abs(float(r["shift"])) < 1e-5 for r in rows)
    assert len(res.shifts) == 2 and not res.scores  # no judge: no scores


def _cli_error(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    return result.output


def test_screen_and_shift_bad_input_is_one_line(llama_dir, data, tmp_path):
    other = tmp_path / "other.pt"
    save_vector(PersonaVector(np.ones((9, 32), np.float32)), other)
    base = ["--model", llama_dir, "--backend", "torch", "--layer", 2]
    out = _cli_error(
        "screen", *base, "--vector", other, "--data", data, "--out", tmp_path / "s.csv"
    )
    assert "another model" in out
    screen = ["screen", *base, "--vector", other, "--data", data, "--out", tmp_path / "s.csv"]
    assert "--batch-size must be at least 1" in _cli_error(*screen, "--batch-size", 0)
    assert "--workers needs --ray" in _cli_error(*screen, "--workers", 2)
    assert not (tmp_path / "s.csv").exists()
    out = _cli_error("shift", "--base", llama_dir, "--finetuned", llama_dir, "--backend", "torch",
                     "--trait", "paternalism", "--vector", other, "--layers", 2,
                     "--out", tmp_path / "sh")  # fmt: skip
    assert "another model" in out
