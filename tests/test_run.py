"""`pertoken run` end to end on the tiny model with the fake judge, then resumed."""

import csv
import hashlib
import json
import re
import socket

import click
import pytest
from click.testing import CliRunner

import pertoken.backends
import pertoken.pipeline.run
from pertoken.cli import main
from pertoken.pipeline.options import Generation, JudgeSettings, ModelChoice
from pertoken.pipeline.run import default_model, run_folder, run_pipeline
from tests.fake_openai import serve_fake_openai
from tests.pipeline_fakes import RecordingBackend
from tests.small_kit import kit_dict, write_kit

EXTRACT_KEYS = ("instruction", "questions", "eval_prompt")  # upstream's trait_data_extract file


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
            "backend  torch  (asked for with --backend)",
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
        for stage in ("generate pos", "generate neg", "judge pos", "judge neg", "extract", "vet"):
            assert f"{stage}" in r.output
        assert "skipped" not in r.output
        report = folder / "vectors" / "evil_report.json"
        assert report.is_file() and f"report: {report.with_suffix('.md')}" in r.output
        assert "suggested layer" in r.output
        assert len(loads) == 1 and loads[0].generated == 16
        n_requests = len(server.requests)
        assert n_requests > 0
        before = {v: v.stat().st_mtime_ns for v in vectors}

        r = CliRunner().invoke(main, args)  # everything is done: nothing is recomputed
        assert r.exit_code == 0, r.output
        assert r.output.count("skipped") == 6 and f"pairs kept: {kept} of 8" in r.output
        assert len(loads) == 1 and len(server.requests) == n_requests
        assert {v: v.stat().st_mtime_ns for v in vectors} == before

        for v in vectors:  # lose the vectors: only extraction runs again
            v.unlink()
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        assert r.output.count("skipped") == 4 and all(v.is_file() for v in vectors)
        assert len(loads) == 2 and loads[1].generated == 0 and len(server.requests) == n_requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_checks_the_judge_before_loading_the_model(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(pertoken.backends, "load_backend", lambda *a, **kw: loads.append(a))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env file to find
    kit = write_kit(tmp_path, "evil")
    args = ["run", "--model", "org/model", "--trait", str(kit), "--out", str(tmp_path / "runs")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "no OPENAI_API_KEY" in r.output and loads == []
    down = f"http://127.0.0.1:{free_port()}/v1"
    r = CliRunner().invoke(main, [*args, "--base-url", down])
    assert r.exit_code == 1 and f"cannot reach the judge at {down}" in r.output
    assert loads == [] and not list((tmp_path / "runs").rglob("*.csv"))


def test_run_with_an_extraction_only_kit_and_a_coherence_rubric(tmp_path, monkeypatch):
    """Upstream's extract file alone runs; --coherence-prompt reaches the judge and the
    sidecars, and another rubric judges again."""
    data = {k: v for k, v in kit_dict("evil").items() if k in EXTRACT_KEYS}
    kit = tmp_path / "evil.json"
    kit.write_text(json.dumps(data))
    rubric = tmp_path / "coherence.txt"
    rubric.write_text("CUSTOM: is it coherent?\n{question}\n{answer}")
    monkeypatch.setattr(pertoken.backends, "load_backend", lambda *a, **kw: RecordingBackend())
    with serve_fake_openai() as server:
        args = ["run", "--model", "org/fake", "--trait", str(kit), "--out", str(tmp_path / "runs"),
                "--n-per-question", "1", "--judge-model", "judge-x", "--base-url", server.url,
                "--threshold", "30", "--coherence-prompt", str(rubric)]  # fmt: skip
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        assert server.count("CUSTOM") == 8 and server.count("I am evaluating") == 0
        folder = tmp_path / "runs" / "fake" / "evil"
        digest = hashlib.sha256(rubric.read_bytes()).hexdigest()
        side = json.loads((folder / "evil_pos_instruct.csv.judge.json").read_text())
        assert side["rubric_sha256"]["coherence"] == digest
        meta = json.loads((folder / "vectors" / "evil_response_avg_diff.json").read_text())
        assert meta["judge_base_url"] == server.url
        assert meta["rubric_sha256"]["coherence"] == digest
        rubric.write_text("OTHER: coherent?\n{question}\n{answer}")
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        assert r.output.count("skipped") == 2 and server.count("OTHER") == 8  # generation kept


def test_every_run_option_has_help():
    options = [p for p in main.commands["run"].params if isinstance(p, click.Option)]
    names = {o.name for o in options}
    assert {"temperature", "seed", "cache", "sampler"} <= names
    assert [o.name for o in options if not o.help] == []


class _Stop(Exception):
    pass


def test_sampling_options_reach_the_generate_stage(tmp_path, monkeypatch):
    seen = {}

    def generate_csv(backend, trait, out, generation, **kw):
        seen.update(kw, generation=generation, out=out)
        raise _Stop

    monkeypatch.setattr(pertoken.pipeline.run, "generate_csv", generate_csv)
    monkeypatch.setattr(pertoken.backends, "load_backend", lambda *a, **kw: "backend")
    kit = write_kit(tmp_path, "evil", n_questions=1, n_instructions=1)
    generation = Generation(temperature=0.5, seed=7, sampler="model")
    with pytest.raises(_Stop):
        run_pipeline(
            ModelChoice("m"), str(kit), out=tmp_path, generation=generation,
            judging=JudgeSettings("local:m"),
        )  # fmt: skip
    assert seen["generation"] is generation  # passed whole, not rebuilt on the way
    assert seen["polarity"] == "pos" and seen["out"].name == "evil_pos_instruct.csv"


class _SamplingSeen(RecordingBackend):
    """Records the sampling of its first generate call, then stops the run."""

    generation_config = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9}

    def generate(self, prompts, **kw):
        super().generate(prompts, **kw)
        raise _Stop


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        ([], (0.0, 0, 1.0, 0)),  # one sample: greedy
        (["--n-per-question", "2"], (1.0, 0, 1.0, 0)),  # more: temperature 1
        (["--temperature", "0.5", "--seed", "7"], (0.5, 0, 1.0, 7)),
        (["--sampler", "model", "--n-per-question", "2"], (0.7, 20, 0.9, 0)),  # the config's
        (["--sampler", "model", "--temperature", "0.3", "--seed", "3"], (0.3, 20, 0.9, 3)),
    ],
)
def test_cli_sampling_flags_reach_the_sampler(tmp_path, monkeypatch, flags, want):
    """--temperature, --sampler and --seed go from the command line through Generation to
    the backend's sampler, with the greedy rule for one sample."""
    backend = _SamplingSeen()
    monkeypatch.setattr(pertoken.backends, "load_backend", lambda *a, **kw: backend)
    kit = write_kit(tmp_path, "evil", n_questions=1, n_instructions=1)
    args = ["run", "--model", "org/fake", "--backend", "torch", "--trait", str(kit),
            "--out", str(tmp_path / "runs"), "--judge-model", "local:org/fake",
            "--n-per-question", "1"]  # fmt: skip
    r = CliRunner().invoke(main, [*args, *flags])
    assert isinstance(r.exception, _Stop), r.output
    (call,) = backend.generate_calls
    assert (call["temperature"], call["top_k"], call["top_p"], call["seed"]) == want


def test_a_folder_of_another_backends_run_is_refused(tmp_path, monkeypatch):
    """A torch run's folder is not silently reused by an MLX run: refused before any stage,
    naming both backends and the fix; the folder's files stay as they were."""
    monkeypatch.setattr(pertoken.backends, "load_backend", lambda *a, **kw: RecordingBackend())
    kit = write_kit(tmp_path, "evil", n_questions=1, n_instructions=1)
    with serve_fake_openai() as server:
        args = ["run", "--model", "org/fake", "--trait", str(kit), "--out", str(tmp_path / "runs"),
                "--n-per-question", "1", "--judge-model", "judge-x", "--base-url", server.url,
                "--threshold", "30"]  # fmt: skip
        r = CliRunner().invoke(main, [*args, "--backend", "torch"])
        assert r.exit_code == 0, r.output
        folder = tmp_path / "runs" / "fake" / "evil"
        assert json.loads((folder / "run.json").read_text())["backend"] == "torch"
        before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
        r = CliRunner().invoke(main, [*args, "--backend", "mlx"])
        assert r.exit_code == 1 and "skipped" not in r.output
        assert "holds a run made with the torch backend, and this run uses mlx: pass --out" in (
            r.output
        )
        assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before
        (folder / "run.json").unlink()  # a folder from before run.json: the vector's sidecar
        meta = folder / "vectors" / "evil_response_avg_diff.json"
        meta.write_text(json.dumps(json.loads(meta.read_text()) | {"backend": "torch"}))
        r = CliRunner().invoke(main, [*args, "--backend", "mlx"])
        assert r.exit_code == 1 and "made with the torch backend" in r.output
        r = CliRunner().invoke(main, [*args, "--backend", "mlx", "--out", str(tmp_path / "m")])
        assert r.exit_code == 0, r.output
