"""`pertoken sweep PLAN.toml`: the plan's checks, the GPUs a job asks for, and a sweep of two
kits and a broken one on the tiny model: killed, resumed on a local Ray runtime without
redoing finished stages, the broken kit reported, the vectors those of two `pertoken run`s."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pertoken.backends.memory
from pertoken.backends.memory import Weights
from pertoken.cli import main
from pertoken.pipeline.sweep.jobs import gpus_for
from tests.cli_runner import pertoken_cli
from tests.fake_openai import serve_fake_openai
from tests.small_kit import write_kit

RUN = dict(backend="torch", dtype="float32", n_per_question=2, max_new_tokens=6,
           judge_model="judge-x", threshold=30, temperature=0.5, concurrency=1)  # fmt: skip
VECTORS = ("response_avg", "prompt_avg", "prompt_last")


def _toml(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower()


def _plan(tmp_path, model, base_url, extra="") -> Path:
    run = "\n".join(f"{k} = {_toml(v)}" for k, v in (RUN | {"base_url": base_url}).items())
    path = tmp_path / "plan.toml"
    path.write_text(
        f'models = ["{model}"]\ntraits = ["evil.json", "kind.json", "broken.json"]\n'
        f'out = "study"\n{extra}\n[run]\n{run}\n'
        "[eval]\nlayers = [2]\ncoefs = [0, 1]\nn_per_question = 1\nmax_new_tokens = 4\n"
        '[trace]\ninputs = ["chats.jsonl"]\nlayers = [1, 3]\n'
    )
    return path


def _rows(path):
    with open(path, newline="") as f:
        return {r["trait"]: r for r in csv.DictReader(f)}


def _one_line(tmp_path, text, needle):
    (tmp_path / "p.toml").write_text(text)
    r = CliRunner().invoke(main, ["sweep", str(tmp_path / "p.toml")])
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert r.exit_code == 1 and len(errors) == 1 and needle in errors[0], r.output
    assert "Traceback" not in r.output


def test_bad_plans_are_one_line(tmp_path):
    ok = 'models = ["a/m"]\ntraits = ["evil"]\nout = "o"\n'
    _one_line(tmp_path, "models = [", "is not valid TOML")
    _one_line(tmp_path, ok.replace("out", "outt"), "unknown key 'outt'")
    _one_line(tmp_path, 'traits = ["evil"]\nout = "o"\n', "`models` must be a list")
    _one_line(tmp_path, ok + "[run]\nn_samples = 3\n", "[run]: unknown key 'n_samples'")
    _one_line(tmp_path, ok + '[eval]\ncoefs = "all"\n', 'coefs must be a list of numbers or "auto"')
    _one_line(tmp_path, ok.replace('"a/m"', '"a/m", "b/m"'), "would write the same folder 'm'")
    assert not (tmp_path / "o").exists()


def test_the_judge_is_checked_before_any_job(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env file to find
    _one_line(tmp_path, 'models = ["a/m"]\ntraits = ["evil"]\nout = "o"\n', "no OPENAI_API_KEY")
    assert not (tmp_path / "o").exists()


def test_a_job_asks_for_the_gpus_its_weights_need(monkeypatch):
    def weights(gb):
        return lambda model, dtype=None: Weights(int(gb * 2**30), None, 16, "config")

    monkeypatch.setattr(pertoken.backends.memory, "estimate_weights", weights(150))
    assert gpus_for("org/big", dtype=None, gpu_memory_gb=80) == 3  # 150 GB x 1.2 headroom
    monkeypatch.setattr(pertoken.backends.memory, "estimate_weights", weights(10))
    assert gpus_for("org/small", dtype=None, gpu_memory_gb=80) == 1
    monkeypatch.setattr(pertoken.backends.memory, "estimate_weights", lambda *a, **k: None)
    assert gpus_for("org/unknown", dtype=None, gpu_memory_gb=80) == 1


def _kill_after(plan: Path, done: Path, env: dict) -> None:
    """Run the sweep in its own process (no Ray) and kill it once `done` exists."""
    log = open(plan.parent / "first.log", "w")
    code = "from pertoken.cli import main; main()"
    p = subprocess.Popen([sys.executable, "-c", code, "sweep", str(plan)],
                         env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not done.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done.exists(), (plan.parent / "first.log").read_text()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        log.close()


def test_a_killed_sweep_resumes_on_ray_and_matches_two_runs(tmp_path, llama_dir, ray_local):
    for name in ("evil", "kind"):
        write_kit(tmp_path, name)
    (tmp_path / "broken.json").write_text('{"name": "broken"}')
    (tmp_path / "chats.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "hello there"}]}\n'
    )
    study = tmp_path / "study" / "tiny-llama"
    with serve_fake_openai() as server:
        plan = _plan(tmp_path, llama_dir, server.url)
        env = os.environ | {"OPENAI_API_KEY": "sk-test-dummy", "OMP_NUM_THREADS": "1",
                            "PERTOKEN_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
        _kill_after(plan, study / "evil" / ".trace-chats.done.json", env)
        assert not (tmp_path / "study" / "sweep.csv").exists()  # it was killed before the end
        evil = [study / "evil" / "vectors" / f"evil_{k}_diff.pt" for k in VECTORS]
        before = {p: p.stat().st_mtime_ns for p in evil}

        with pertoken_cli(tmp_path / "cache") as cli:
            env = {"OPENAI_API_KEY": "sk-test-dummy", "PERTOKEN_CACHE_DIR": str(tmp_path / "cache")}
            r = CliRunner().invoke(main, ["sweep", str(plan), "--ray", "local"], env=env)
            out = r.output
            assert r.exit_code == 1 and "2 done, 1 failed" in out.splitlines()[-1], out
            rows = _rows(tmp_path / "study" / "sweep.csv")
            assert rows["evil"]["state"] == "done" and rows["evil"]["ran"] == ""  # nothing redone
            assert {p: p.stat().st_mtime_ns for p in evil} == before
            assert rows["kind"]["state"] == "done" and "extract" in rows["kind"]["ran"]
            assert rows["broken"]["state"].startswith("failed: ") and "instruction" in out
            for r in (rows["evil"], rows["kind"]):
                assert r["pairs_kept"] == "8" and r["suggested_row"] and r["heldout_auroc"]
                assert r["best_eval"].startswith("layer 2 coef 1")
            assert (study / "kind" / "trace" / "chats" / "tokens.parquet").is_file()
            assert server.max_inflight == 1  # concurrency 1, held across both tasks

            for kit in ("evil", "kind"):
                args = [f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]
                cli("run", "-m", llama_dir, "--trait", tmp_path / f"{kit}.json", "--out",
                    tmp_path / "runs", "--base-url", server.url, *args)  # fmt: skip
    for kit in ("evil", "kind"):
        for k in VECTORS:
            a, b = (root / "tiny-llama" / kit / "vectors" / f"{kit}_{k}_diff.pt"
                    for root in (tmp_path / "study", tmp_path / "runs"))  # fmt: skip
            assert torch.equal(torch.load(a), torch.load(b)), (kit, k)


@pytest.fixture(autouse=True)
def one_thread(torch_one_thread):
    yield
