"""pertoken's MLX backend against plain mlx-lm on the same model and prompts.

    python benchmarks/bench_mlx.py --model mlx-community/Meta-Llama-3.1-8B-Instruct-4bit  # a Mac
    python benchmarks/bench_mlx.py --random 256x8        # random Llama, hidden 256, 8 layers

Measures, median of --reps after a warm-up, greedy and always to full length:
(a) tokens/s of pertoken's batched generation, steered at one row with the hidden states of
three rows captured at every answer token, vs mlx-lm's `batch_generate` (batch > 1) or
`generate_step` (batch 1) without steering or capture; (b) `summaries` throughput (all rows'
means per sample) vs plain mlx-lm forwards over the same padded batches. Prints one table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from pertoken.backends.base import Sampling, Steer, Streaming
from pertoken.backends.mlx import MLXBackend
from pertoken.backends.mlx.load import DTYPES
from pertoken.backends.plan import left_pad


def random_llama(hidden: int, layers: int, folder: Path, vocab: int = 1024) -> Path:
    """A random Llama-3-style checkpoint with a word-level tokenizer (`t{i}` is token i)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    heads = max(4, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), pad_token="t0", eos_token="t1"
    )
    fast.save_pretrained(folder)
    return folder


def paired_rates(ours, theirs, reps: int) -> tuple[float, float]:
    """Units per second (each function returns its units of work), median of `reps` runs
    interleaved so that a busy machine slows both alike, after one warm-up run each."""
    units = ours(), theirs()
    times = ([], [])
    for _ in range(reps):
        for fn, ts in zip((ours, theirs), times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return units[0] / statistics.median(times[0]), units[1] / statistics.median(times[1])


def prompt_ids(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, length).tolist() for _ in range(n)]


def pertoken_generate(b: MLXBackend, seqs, new: int, steer: Steer, rows: list[int]) -> int:
    """Steered generation with capture at `rows`; returns the number of answer tokens."""
    kept = []
    stream = Streaming(kept.append, rows=rows)
    stop, b.stop = b.stop, set()  # random weights: always run to length
    try:
        b.generate([b.decode(s) for s in seqs], max_new_tokens=new, sampling=Sampling(0.0),
                   steer=steer, stream=stream, batch_size=len(seqs))  # fmt: skip
    finally:
        b.stop = stop
    assert all(s.hidden is not None for s in kept)
    return len(kept)


def mlx_lm_generate(model, tokenizer, seqs, new: int) -> int:
    """Plain mlx-lm greedy generation of the same prompts; returns the number of tokens."""
    from mlx_lm import batch_generate
    from mlx_lm.generate import generate_step

    if len(seqs) == 1:
        steps = generate_step(mx.array(seqs[0]), model, max_tokens=new)
        return sum(1 for _ in steps)
    out = batch_generate(model, tokenizer, seqs, max_tokens=new, return_token_ids=True)
    return sum(len(t) for t in out.token_ids)


def mlx_lm_forwards(model, seqs, batch_size: int) -> int:
    """Plain mlx-lm forwards (logits of every position) over the same padded batches."""
    for i in range(0, len(seqs), batch_size):
        mx.eval(model(mx.array(left_pad(seqs[i : i + batch_size], 0).ids)))
    return len(seqs)


def generation_rows(b, model, tokenizer, args):
    mid = max(1, b.n_layers // 2)
    steer = Steer.single(mid, np.random.default_rng(0).standard_normal(b.hidden_size), 4.0)
    rows = sorted({1, mid, b.n_layers})
    for batch in args.batches:
        seqs = prompt_ids(batch, args.prompt_len, int(b.config["vocab_size"]), seed=batch)

        def ours(s=seqs):
            return pertoken_generate(b, s, args.new_tokens, steer, rows)

        def theirs(s=seqs):
            return mlx_lm_generate(model, tokenizer, s, args.new_tokens)

        pt, base = paired_rates(ours, theirs, args.reps)
        name = "mlx-lm " + ("generate_step" if batch == 1 else "batch_generate")
        yield f"gen tok/s, batch {batch}, steered + {len(rows)} rows captured", pt, base, name


def summaries_row(b, model, args):
    seqs = prompt_ids(args.extract_n, args.extract_len, int(b.config["vocab_size"]), seed=99)
    half = args.extract_len // 2
    prompts = [" ".join(f"t{i}" for i in s[:half]) for s in seqs]
    answers = [" " + " ".join(f"t{i}" for i in s[half:]) for s in seqs]
    eb = args.extract_batch
    pt, base = paired_rates(
        lambda: len(b.summaries(prompts, answers, batch_size=eb).prompt_avg),
        lambda: mlx_lm_forwards(model, seqs, eb),
        args.reps,
    )
    what = f"summaries seq/s, {args.extract_len} tokens, batch {eb}"
    return what, pt, base, "mlx-lm forward (logits only)"


def measure(args) -> list[tuple[str, float, float, str]]:
    from mlx_lm import load as mlx_lm_load

    b = MLXBackend.load(args.model, dtype=args.dtype)
    model, tokenizer = mlx_lm_load(args.model)
    model.set_dtype(DTYPES[b.dtype])
    tokenizer._eos_token_ids = set()  # run to length, as pertoken does here
    return [*generation_rows(b, model, tokenizer, args), summaries_row(b, model, args)]


def table(model: str, device: str, dtype: str, rows) -> str:
    lines = [
        f"model: {model} ({dtype}, {device})",
        "| measure | pertoken | mlx-lm | baseline | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for what, pt, base, name in rows:
        lines.append(f"| {what} | {pt:.1f} | {base:.1f} | {name} | {pt / base:.2f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder, hub id or mlx-community repo")
    ap.add_argument("--random", default=None, help="HIDDENxLAYERS: build a random Llama")
    ap.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (auto)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--extract-n", type=int, default=32)
    ap.add_argument("--extract-len", type=int, default=128)
    ap.add_argument("--extract-batch", type=int, default=8)
    args = ap.parse_args()
    args.batches = [int(x) for x in args.batches.split(",")]
    if args.random:
        hidden, layers = (int(x) for x in args.random.lower().split("x"))
        args.model = str(random_llama(hidden, layers, Path(tempfile.mkdtemp()) / "random-llama"))
    if not args.model:
        ap.error("give --model or --random")
    rows = measure(args)
    b_device = "gpu" if mx.metal.is_available() else "cpu"
    print(table(args.model if not args.random else f"random llama {args.random}", b_device,
                args.dtype or "auto", rows))  # fmt: skip


if __name__ == "__main__":
    main()
