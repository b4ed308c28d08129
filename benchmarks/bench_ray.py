"""The trace stage on Ray model actors against the plain process.

    python benchmarks/bench_ray.py                          # random Llama 512x8, CPU
    python benchmarks/bench_ray.py --hidden 256 --layers 4 --items 32 --reps 2

On one random Llama-3-style model (bench_trace.py's: word-level tokenizer, teacher-forced
CSV items of --tokens tokens, two vectors at three rows), items/s of the whole
`trace_dataset` stage (CSV in, Parquet out, no page) for:
(a) the plain process, model loaded here, torch on one thread;
(b) `--ray local` with 1 worker (one actor, one CPU, one torch thread);
(c) `--ray local` with 2 workers.
The pools are started (and their models loaded) once before timing; their start-up seconds
are printed apart. The three take turns in each of --reps repetitions and the best run of each
counts. Ray's overhead is (a)/(b) - 1; the goal is at most 10%. Chunks of --chunk items are the
unit the actors share. Stores are checked equal to the plain process's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trace import interleaved, random_llama, rows_of, vectors, write_items  # noqa: E402


def _threads(backend, _shard) -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import torch

    from pertoken.backends import load_backend
    from pertoken.pipeline.distributed import ModelPool, map_shards, ray_runtime
    from pertoken.pipeline.options import ModelChoice
    from pertoken.pipeline.trace.dataset import Tracing, trace_dataset

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    folder = random_llama(work / "model", args.hidden, args.layers)
    data = write_items(work / "items.csv", args.items, args.tokens)
    spec = ModelChoice(str(folder), "torch", "float32", "cpu")
    plain = load_backend(str(folder), "torch", dtype="float32", device="cpu")
    vecs, rows = vectors(plain.n_layers, plain.hidden_size), rows_of(plain.n_layers)
    runs = iter(range(10_000))

    def stage(backend, pool=None, name="plain"):
        out = work / f"{name}-{next(runs)}"
        t = Tracing(page=False, progress=False, batch_size=args.batch, chunk=args.chunk)
        trace_dataset(backend, input=data, vectors=vecs, rows=rows, out_dir=out, tracing=t,
                      pool=pool)  # fmt: skip
        return out

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # a shared machine's peaks
    # three logical CPUs hold the three actors; the contenders take turns, never overlap
    with ray_runtime("local", num_cpus=3, log_to_driver=False):
        pools, start = {}, {}
        for n in (1, 2):
            t0 = time.perf_counter()
            pools[n] = ModelPool(spec, n)
            info = pools[n].info()
            list(map_shards(_threads, range(n), pool=pools[n]))  # every actor has loaded
            start[n] = time.perf_counter() - t0
        threads = sorted({t for _, t in map_shards(_threads, range(4), pool=pools[2])})
        same = [
            (stage(info, pools[n], f"ray{n}") / "tokens.parquet").read_bytes()
            == (stage(plain) / "tokens.parquet").read_bytes()
            for n in (1, 2)
        ]
        t = interleaved(
            {
                "plain": lambda: stage(plain),
                "ray1": lambda: stage(info, pools[1], "ray1"),
                "ray2": lambda: stage(info, pools[2], "ray2"),
            },
            args.reps,
        )
        for p in pools.values():
            p.close()

    n = args.items
    print(f"random Llama {args.hidden}x{args.layers}, {n} items of {args.tokens} tokens, "
          f"chunks of {args.chunk}, batch {args.batch}, best of {args.reps}; torch threads "
          f"per actor {threads}, stores equal to the plain process's: {all(same)}")  # fmt: skip
    print(f"{'contender':34s} {'items/s':>8s} {'vs plain':>9s}")
    for name, label in (("plain", "plain process (1 thread)"), ("ray1", "--ray local, 1 worker"),
                        ("ray2", "--ray local, 2 workers")):  # fmt: skip
        print(f"{label:34s} {n / t[name]:8.2f} {t['plain'] / t[name]:8.2f}x")
    print(f"Ray overhead at 1 worker: {t['ray1'] / t['plain'] - 1:+.1%} (goal <= +10%)")
    print(f"pool start-up, model loaded: 1 worker {start[1]:.1f}s, 2 workers {start[2]:.1f}s")


if __name__ == "__main__":
    main()
