"""The notebook API: `pertoken.load`, lazy top-level names, and the README's example."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pertoken
from pertoken.errors import PertokenError
from pertoken.vectors import PersonaVector, save_vector

README = Path(__file__).resolve().parents[1] / "README.md"
NAMES = ["PersonaVector", "load_vector", "Steer", "extract_vectors", "monitor", "evaluate"]


def test_import_pertoken_and_its_names_stay_light():
    code = (
        "import sys, pertoken;"
        f"objs = [getattr(pertoken, n) for n in {[*NAMES, 'load']!r}] + [pertoken.trace.load];"
        "heavy = [m for m in ('torch', 'mlx', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy;"
        "print(len(objs))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "8"


def test_top_level_names_are_the_pipeline_objects():
    from pertoken.backends.base import Steer
    from pertoken.pipeline import extract, monitor
    from pertoken.pipeline.sweep import grid as evaluate

    assert pertoken.PersonaVector is PersonaVector and pertoken.Steer is Steer
    assert pertoken.extract_vectors is extract.extract_vectors
    assert pertoken.monitor is monitor.monitor and not hasattr(pertoken, "load_traces")
    assert pertoken.evaluate is evaluate.evaluate
    assert set(NAMES) <= set(dir(pertoken)) and set(NAMES) <= set(pertoken.__all__)
    with pytest.raises(AttributeError, match="no attribute 'steer'"):
        pertoken.steer  # noqa: B018


def test_the_option_objects_and_the_run_are_top_level_names():
    from pertoken.pipeline import options, run

    assert pertoken.run_pipeline is run.run_pipeline
    for name in ("ModelChoice", "Generation", "JudgeSettings", "Extraction"):
        assert getattr(pertoken, name) is getattr(options, name) and name in pertoken.__all__
    code = "import sys, pertoken; pertoken.Generation; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_load_returns_the_backend(llama_dir):
    b = pertoken.load(str(llama_dir), dtype="float32", device="cpu")
    assert (b.name, b.n_layers, b.hidden_size, b.dtype) == ("torch", 4, 64, "float32")
    assert pertoken.load(str(llama_dir), "torch").model_id == llama_dir.name
    with pytest.raises(PertokenError, match="unknown backend"):
        pertoken.load(str(llama_dir), backend="jax")


def readme_example() -> str:
    section = README.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(llama_dir, tmp_path, monkeypatch, capsys, torch_one_thread):
    code = readme_example()
    assert len(code.strip().splitlines()) < 15
    path = save_vector(
        PersonaVector(np.random.default_rng(0).normal(size=(5, 64))), tmp_path / "v.pt"
    )
    swaps = {
        '"google/gemma-2-2b-it"': repr(str(llama_dir)),
        '"paternalism_response_avg_diff.pt"': repr(str(path)),
        "layer = 12": "layer = 2",  # the tiny model has 4 blocks
    }
    for old, new in swaps.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    out = capsys.readouterr().out
    backend, chat, steer = ns["backend"], ns["chat"], ns["steer"]
    answer = backend.generate([chat], max_new_tokens=80, temperature=0, steer=steer)[0]
    assert answer in out and answer != backend.generate([chat], max_new_tokens=80, temperature=0)[0]
    _, items = pertoken.trace.load(tmp_path / "monitored")
    settings = pertoken.trace.read_settings(tmp_path / "monitored")
    assert len(items) == 1 and settings["rows"] == [2]
    assert list(settings["vectors"]) == ["paternalism"] and settings["steer"]
    mean = ns["records"][0]["mean"]
    assert items["mean.paternalism.L2.answer"][0] == pytest.approx(mean[0][0], rel=1e-5)
    assert str(mean) in out and (tmp_path / "monitored" / "trace.html").is_file()


def test_trace_load_works_after_a_plain_import(tmp_path):
    """`import pertoken` then `pertoken.trace.load(DIR)`, as the README writes it, in a fresh
    interpreter (here the suite may have imported pertoken.trace already)."""
    import subprocess
    import sys

    code = (
        "import pertoken\n"
        f"try:\n    pertoken.trace.load({str(tmp_path)!r})\n"
        "except pertoken.PertokenError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"refused: {tmp_path} has no tokens.parquet")
