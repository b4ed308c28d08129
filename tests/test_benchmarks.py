"""The benchmark scripts still run: their CPU self-checks, on tiny sizes."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_cuda_self_check_passes_on_the_cpu():
    out = _run("bench_cuda.py", "--tiny", "--reps", "1")
    for model in ("llama", "gemma2"):
        assert f"| {model} | compiled == eager | True |" in out
        assert f"| {model} | batched == single | True |" in out


def test_bench_generate_gives_every_method_its_forced_lengths():
    # the script fails unless each method writes exactly the drawn answer lengths
    out = _run("bench_generate.py", "--random", "64x2", "--prompts", "6", "--batch-size", "3",
               "--max-new-tokens", "12", "--median", "0.5", "--reps", "1")  # fmt: skip
    assert "pertoken continuous, compiled step / pertoken continuous" in out
    assert "pertoken continuous / mlx-lm batch_generate" in out


def test_bench_serve_counts_each_servers_forward_passes():
    # one streamed request of 4 tokens (stop tokens banned): a prefill and three decode steps
    out = _run("bench_serve.py", "--random", "64x2", "--no-others", "--loads", "1", "--reps",
               "1", "--requests", "1", "--new-tokens", "4", "--ban-stop", "--count")  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("| 1 client | pertoken |"))
    passes, rows = map(int, line.rstrip(" |").rsplit("| ", 1)[1].split("/"))
    assert passes == 4 and rows > passes  # the prefill runs the prompt's new tokens at once
