"""Per-token traces over a dataset: `pertoken trace` against the monitor loop and `summaries`.

    python benchmarks/bench_trace.py                      # torch, random Llama 512x8, CPU
    python benchmarks/bench_trace.py --backend mlx --hidden 256 --layers 4 --items 32
    python benchmarks/bench_trace.py --rss 64,256,1024    # peak RSS against the number of items

On one random Llama-3-style model (word-level tokenizer, `t{i}` is token i), teacher-forced
items of --tokens tokens, --batch sequences per forward, the best of --reps runs:
(a) tokens/s of the whole `trace_dataset` stage (CSV in, tokenization with offsets, segments,
    projections onto two vectors at three rows, Parquet out, no page);
(b) tokens/s of the backend's `token_projections` alone;
(c) tokens/s of the backend's plain `summaries` over the same items (every row's means);
(d) tokens/s of today's `monitor` loop (batch 1, a host sync per generated token).
The four take turns in each of the --reps repetitions. Prints one table with the ratios of (a)
to the others. `--rss` runs the trace stage in a fresh process per item count and prints each
one's peak resident memory.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEMPLATE = (
    "{% for m in messages %}t2 {{ m['content'] }} t3 {% endfor %}"
    "{% if add_generation_prompt %}t4 {% endif %}"
)


def random_llama(folder: Path, hidden: int, layers: int, vocab: int = 1024) -> Path:
    """A random Llama-3-style checkpoint with a word-level tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    heads = max(4, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False,
        eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), pad_token="t0", eos_token="t1"
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return folder


def write_items(path: Path, n: int, tokens: int, seed: int = 0) -> Path:
    """A generation CSV of n items of exactly `tokens` tokens (32 prompt, the rest answer)."""
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(f"t{w}" for w in rng.integers(5, 1024, size=k))  # noqa: E731
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "prompt", "answer", "question_id", "score"])
        for i in range(n):
            prompt = f"t2 {words(29)} t3 t4 "
            w.writerow([f"q{i}", prompt, words(tokens - 32), f"q_{i}", int(rng.integers(100))])
    return path


def vectors(n_layers: int, hidden: int):
    from pertoken.vectors import PersonaVector

    rng = np.random.default_rng(1)
    return {
        n: PersonaVector(rng.normal(size=(n_layers + 1, hidden)).astype(np.float32))
        for n in ("pat", "dec")
    }


def rows_of(n_layers: int) -> list[int]:
    return sorted({n_layers // 4, n_layers // 2, 3 * n_layers // 4})


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    """The shortest of `reps` timed calls of each function, in seconds; the functions take
    turns within each repetition, so a change in the machine's load hits them alike."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def throughput(args, folder: Path, work: Path) -> list[tuple[str, float]]:
    from pertoken.backends import load_backend
    from pertoken.pipeline.monitor import Monitoring, monitor
    from pertoken.pipeline.options import Generation
    from pertoken.pipeline.trace.dataset import Tracing, trace_dataset, unit_directions
    from pertoken.pipeline.trace.inputs import read_items

    b = load_backend(str(folder), args.backend, dtype="float32", device="cpu")
    data = write_items(work / "items.csv", args.items, args.tokens)
    vecs, rows = vectors(b.n_layers, b.hidden_size), rows_of(b.n_layers)
    items = read_items(data)
    prompts, answers = [it.prompt for it in items], [it.answer for it in items]
    ids = [b.encode(p + a) for p, a in zip(prompts, answers)]
    n_tokens = sum(map(len, ids))
    _, units = unit_directions(b, vecs, rows)
    runs = iter(range(1000))

    def stage():
        out = work / f"store-{next(runs)}"
        t = Tracing(page=False, progress=False, batch_size=args.batch)
        trace_dataset(b, input=data, vectors=vecs, rows=rows, out_dir=out, tracing=t)

    n_mon = []

    def mon():
        prompts = [f"t{5 + i} t{9 + i}" for i in range(args.monitor_prompts)]
        gen = Generation(samples=1, max_tokens=args.monitor_tokens)
        recs = monitor(b, prompts, vecs, rows, gen, Monitoring(out_dir=None))
        n_mon.append(sum(len(r["tokens"]) for r in recs))

    b.token_projections(ids[: args.batch], units, rows, batch_size=args.batch)  # warm-up
    t = interleaved(
        {
            "stage": stage,
            "proj": lambda: b.token_projections(ids, units, rows, batch_size=args.batch),
            "summaries": lambda: b.summaries(prompts, answers, batch_size=args.batch),
            "monitor": mon,
        },
        args.reps,
    )
    return [
        ("trace stage (CSV -> Parquet)", n_tokens / t["stage"]),
        ("token_projections", n_tokens / t["proj"]),
        ("summaries (plain)", n_tokens / t["summaries"]),
        ("monitor loop (batch 1)", min(n_mon) / t["monitor"]),
    ]


def peak_rss(args, folder: Path, work: Path) -> list[tuple[int, float]]:
    """Peak RSS (MB) of a fresh process tracing n items, for each n in --rss."""
    out = []
    for n in [int(x) for x in args.rss.split(",")]:
        data = write_items(work / f"rss-{n}.csv", n, args.tokens)
        code = (
            "import json, resource, sys; sys.argv = ['x'];"
            "from benchmarks.bench_trace import rss_child;"
            f"rss_child({str(folder)!r}, {str(data)!r}, {str(work / f'rss-store-{n}')!r}, "
            f"{args.backend!r}, {args.batch}, {args.threads})"
        )
        root = Path(__file__).resolve().parents[1]
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
        if res.returncode:
            raise SystemExit(res.stderr)
        out.append((n, json.loads(res.stdout.strip().splitlines()[-1])["rss_mb"]))
    return out


def rss_child(folder: str, data: str, out: str, backend: str, batch: int, threads) -> None:
    from pertoken.backends import load_backend

    if threads:
        import torch

        torch.set_num_threads(threads)
    from pertoken.pipeline.trace.dataset import Tracing, trace_dataset

    b = load_backend(folder, backend, dtype="float32", device="cpu")
    vecs, rows = vectors(b.n_layers, b.hidden_size), rows_of(b.n_layers)
    t = Tracing(page=False, progress=False, batch_size=batch, chunk=64)
    trace_dataset(b, input=data, vectors=vecs, rows=rows, out_dir=out, tracing=t)
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--monitor-prompts", type=int, default=2)
    ap.add_argument("--monitor-tokens", type=int, default=128)
    ap.add_argument("--rss", default=None, help="item counts, e.g. 64,256,1024")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = random_llama(work / "model", args.hidden, args.layers)
        print(
            f"random Llama {args.hidden}x{args.layers}, {args.backend}, {args.items} items of "
            f"{args.tokens} tokens, batch {args.batch}, load average {os.getloadavg()[0]:.1f}"
        )
        if args.rss:
            for n, mb in peak_rss(args, folder, work):
                print(f"peak RSS, {n:>5} items: {mb:8.1f} MB")
            return
        table = throughput(args, folder, work)
        stage = table[0][1]
        print(f"{'measure':<30} {'tok/s':>10} {'trace stage / this':>20}")
        for name, rate in table:
            print(f"{name:<30} {rate:>10.0f} {stage / rate:>19.2f}x")


if __name__ == "__main__":
    main()
