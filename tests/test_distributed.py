"""Ray for the data-parallel stages: a local runtime (the session's `ray_local`), model actors
that trace chunks into the same store one process writes and screen samples into the same CSV,
the judge's shared limit, and the one-line errors when Ray is missing or not reachable."""

import sys
import threading

import numpy as np
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.vectors import PersonaVector, save_vector
from tests.cli_runner import pertoken_cli
from tests.fake_openai import default_reply, serve_fake_openai

PROMPTS = ["What should I do about money?", "Why is the sky blue?", "How do plants grow?"]


def _vector(tmp_path, seed=3):
    data = np.random.default_rng(seed).normal(size=(5, 64)).astype(np.float32)  # tiny Llama
    return save_vector(PersonaVector(data), tmp_path / f"v{seed}.pt")


def _one_line(result, needle):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


def test_ray_missing_or_unreachable_is_one_line(tmp_path, monkeypatch):
    v = _vector(tmp_path)
    args = ["trace", "-m", "org/none", "--vector", f"v={v}", "--layers", "2", "--input",
            str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "out")]  # fmt: skip
    _one_line(CliRunner().invoke(main, [*args, "--workers", "2"]), "--workers needs --ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _one_line(CliRunner().invoke(main, [*args, "--ray", "auto"]), "RAY_ADDRESS")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    _one_line(CliRunner().invoke(main, [*args, "--ray", "local"]), 'pip install "pertoken[ray]"')
    assert not (tmp_path / "out").exists()


def test_trace_on_two_workers_writes_the_same_store(tmp_path, llama_dir, ray_local):
    """Chunks answered and traced by two actors make the same files, byte for byte, as one
    process makes."""
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    v = _vector(tmp_path)
    args = ["trace", "-m", llama_dir, "--backend", "torch", "--dtype", "float32", "--vector",
            f"pat={v}", "--layers", "1,3", "--input", path, "--chunk", "1", "--batch-size", "2",
            "--max-new-tokens", "5", "--temperature", "0.7"]  # fmt: skip
    with pertoken_cli(tmp_path / "cache") as cli:
        cli(*args, "--out", tmp_path / "one")
        out = cli(*args, "--out", tmp_path / "ray", "--ray", "local", "--workers", "2")
    assert "3 items (3 traced now" in out
    assert {n["NodeManagerAddress"] for n in ray_local.nodes()} == {"127.0.0.1"}  # loopback only
    for name in ("tokens.parquet", "items.parquet", "trace.html"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    answers = [sorted((tmp_path / d / "answers.jsonl").read_text().splitlines())
               for d in ("one", "ray")]  # fmt: skip
    assert answers[0] == answers[1] and len(answers[0]) == 3


def test_screen_on_two_workers_writes_the_same_csv(tmp_path, llama_dir, ray_local):
    """Shards of samples scored by two actors make the same CSV and summary, byte for byte,
    as one process makes (two answers a prompt, sampled: the seeds follow the sample)."""
    import csv
    import json

    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(6):
            chat = [
                {"role": "user", "content": PROMPTS[i % 3]},
                {"role": "assistant", "content": f"Answer {i}: think it through first."},
            ]
            f.write(json.dumps({"messages": chat}) + "\n")  # fmt: skip
    v = _vector(tmp_path)
    args = ["screen", "-m", llama_dir, "--backend", "torch", "--dtype", "float32", "--vector",
            f"pat={v}", "--layer", "2", "--data", data, "--n", "2", "--temperature", "0.7",
            "--batch-size", "1", "--max-new-tokens", "5"]  # fmt: skip
    with pertoken_cli(tmp_path / "cache") as cli:
        cli(*args, "--out", tmp_path / "one.csv")
        out = cli(*args, "--out", tmp_path / "ray.csv", "--ray", "local", "--workers", "2")
    assert "6 samples" in out
    for ext in (".csv", ".json"):
        one, ray = ((tmp_path / f"{name}{ext}").read_bytes() for name in ("one", "ray"))
        assert ray == one
    with open(tmp_path / "one.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == [str(i) for i in range(6)]


def test_the_judge_limit_is_shared_across_processes(ray_local, monkeypatch):
    """Two API judges, 4 requests in flight each, under one SharedLimit of 2: the server never
    sees more than 2 at once."""
    from pertoken.pipeline.distributed import SharedLimit
    from pertoken.pipeline.judge.api import ApiJudge, shared_limit

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-dummy")
    with serve_fake_openai() as server:
        server.reply = lambda body, n: ("slow", 0.2, default_reply(body, n))
        with shared_limit(SharedLimit(2)):
            judges = [ApiJudge("judge-x", base_url=server.url, concurrency=4) for _ in range(2)]
        scores = {}
        items = [[(f"{j}-{i}", f"rate {i}") for i in range(6)] for j in range(2)]
        threads = [
            threading.Thread(target=j.run, args=(its, scores.__setitem__, print))
            for j, its in zip(judges, items)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(scores) == 12 and server.max_inflight == 2


def test_generate_and_eval_on_two_workers_write_the_same_files(tmp_path, llama_dir, ray_local):
    """Rows answered in shards and eval settings answered by two actors: the same CSVs."""
    from tests.small_kit import write_kit

    kit = write_kit(tmp_path, "evil", n_questions=3, n_instructions=2)
    model = ["-m", llama_dir, "--backend", "torch", "--dtype", "float32", "--trait", kit,
             "--max-new-tokens", "5", "--batch-size", "2"]  # fmt: skip
    gen = [*model, "--n-per-question", "2", "--temperature", "0.8"]
    ray = ["--ray", "local", "--workers", "2"]
    with pertoken_cli(tmp_path / "cache") as cli, serve_fake_openai() as server:
        cli("generate", *gen, "--out", tmp_path / "one.csv")
        out = cli("generate", *gen, "--out", tmp_path / "ray.csv", *ray)
        assert "12 rows (12 generated now" in out
        assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()

        v = _vector(tmp_path)
        ev = [*model, "--vector", v, "--layers", "1,3", "--coefs", "-4,0,4", "--n-per-question",
              "2", "--judge-model", "judge-x", "--base-url", server.url]  # fmt: skip
        cli("eval", *ev, "--out", tmp_path / "eval-one")
        cli("eval", *ev, "--out", tmp_path / "eval-ray", *ray)
        for name in ("answers.csv", "summary.csv"):
            one, two = ((tmp_path / d / name).read_bytes() for d in ("eval-one", "eval-ray"))
            assert one == two, name
        rows = (tmp_path / "eval-ray" / "answers.csv").read_text().count("evil_")
        assert rows == 2 * 3 * 3 * 2  # layers x coefs x questions x samples
