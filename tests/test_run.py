"""`pertoken run` end to end on the tiny model with the fake judge, then resumed."""

import csv
import re

import click
import pytest
from click.testing import CliRunner

import pertoken.backends
import pertoken.pipeline.run
from pertoken.cli import main
from pertoken.pipeline.run import default_model, run_folder, run_pipeline
from tests.fake_openai import serve_fake_openai
from tests.small_kit import write_kit


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def one_thread(torch_one_thread):
    yield


def test_defaults_and_folder():
    assert default_model("torch") == "google/gemma-2-9b-it"
    assert str(run_folder("runs", "mlx-community/gemma-2-9b-it-4bit/", "evil")) == (
        "runs/gemma-2-9b-it-4bit/evil"
    )


def test_run_end_to_end_then_resume(tmp_path, llama_dir, monkeypatch):
    monkeypatch.setenv("PERTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    kit = write_kit(tmp_path, "evil", n_questions=2, n_instructions=2)
    loads = []
    real_load = pertoken.backends.load_backend

    def counting_load(*args, **kw):
        backend = real_load(*args, **kw)
        loads.append(backend)
        original = backend.generate
        backend.generated, backend.options = 0, []

        def generate(prompts, **kw):
            backend.generated += len(prompts)
            backend.options.append(kw)
            return original(prompts, **kw)

        backend.generate = generate
        return backend

    monkeypatch.setattr(pertoken.backends, "load_backend", counting_load)
    with serve_fake_openai() as server:
        args = [
            "run",
            "--model",
            str(llama_dir),
            "--backend",
            "torch",
            "--dtype",
            "float32",
            "--trait",
            str(kit),
            "--out",
            str(tmp_path / "runs"),
            "--n-per-question",
            "2",
            "--max-new-tokens",
            "6",
            "--judge-model",
            "judge-x",
            "--base-url",
            server.url,
            "--threshold",
            "30",
            "--temperature",
            "0.5",
            "--cache",
            str(tmp_path / "scores.sqlite"),
        ]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        folder = tmp_path / "runs" / "tiny-llama" / "evil"
        banner = r.output.splitlines()[:6]
        assert banner == [
            f"model    {llama_dir}",
            "backend  torch",
            "device   cpu",
            "dtype    float32",
            f"judge    judge-x at {server.url}",
            f"output   {folder}",
        ]
        assert (tmp_path / "scores.sqlite").is_file()
        assert {kw["temperature"] for kw in loads[0].options} == {0.5}
        # each stage's time is printed as it ends, before the next stage's labelled bar
        order = [
            "generate pos: 100%",
            "generate pos +[0-9.]+s  done",
            "generate neg: 100%",
            "generate neg +[0-9.]+s  done",
            "judge pos: 100%",
            "judge pos +[0-9.]+s  done",
            "judge neg: 100%",
            "judge neg +[0-9.]+s  done",
            "extract: 100%",
            "extract +[0-9.]+s  done",
        ]
        at = [re.search(pattern, r.output) for pattern in order]
        assert all(at) and [m.start() for m in at] == sorted(m.start() for m in at), r.output
        vectors = [
            folder / "vectors" / f"evil_{k}_diff.pt"
            for k in ("response_avg", "prompt_avg", "prompt_last")
        ]
        assert all(str(v) in r.output for v in vectors) and all(v.is_file() for v in vectors)
        # the fake judge passes every pair at threshold 30; only empty answers drop out
        pos, neg = (rows_of(folder / f"evil_{p}_instruct.csv") for p in ("pos", "neg"))
        kept = sum(bool(p["answer"]) and bool(n["answer"]) for p, n in zip(pos, neg))
        assert kept >= 4 and f"pairs kept: {kept} of 8" in r.output
        for stage in ("generate pos", "generate neg", "judge pos", "judge neg", "extract"):
            assert f"{stage}" in r.output
        assert "skipped" not in r.output
        assert len(loads) == 1 and loads[0].generated == 16
        n_requests = len(server.requests)
        assert n_requests > 0
        before = {v: v.stat().st_mtime_ns for v in vectors}

        r = CliRunner().invoke(main, args)  # everything is done: nothing is recomputed
        assert r.exit_code == 0, r.output
        assert r.output.count("skipped") == 5 and f"pairs kept: {kept} of 8" in r.output
        assert len(loads) == 1 and len(server.requests) == n_requests
        assert {v: v.stat().st_mtime_ns for v in vectors} == before

        for v in vectors:  # lose the vectors: only extraction runs again
            v.unlink()
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        assert r.output.count("skipped") == 4 and all(v.is_file() for v in vectors)
        assert len(loads) == 2 and loads[1].generated == 0 and len(server.requests) == n_requests


def test_every_run_option_has_help():
    options = [p for p in main.commands["run"].params if isinstance(p, click.Option)]
    names = {o.name for o in options}
    assert {"temperature", "seed", "cache", "sampler"} <= names
    assert [o.name for o in options if not o.help] == []


class _Stop(Exception):
    pass


def test_sampling_options_reach_the_generate_stage(tmp_path, monkeypatch):
    seen = {}

    def generate_csv(backend, **kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(pertoken.pipeline.run, "generate_csv", generate_csv)
    monkeypatch.setattr(pertoken.backends, "load_backend", lambda *a, **kw: "backend")
    kit = write_kit(tmp_path, "evil", n_questions=1, n_instructions=1)
    with pytest.raises(_Stop):
        run_pipeline(
            model="m", trait=str(kit), out=tmp_path, temperature=0.5, seed=7, sampler="model"
        )
    assert (seen["temperature"], seen["seed"], seen["sampler"]) == (0.5, 7, "model")
    assert seen["label"] == "generate pos"
