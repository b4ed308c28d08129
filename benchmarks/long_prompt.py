"""A long prompt through the MLX backend: one forward with [T, T] masks against chunked prefill.

    python benchmarks/long_prompt.py                    # 4,000 tokens, tiny random models, CPU
    python benchmarks/long_prompt.py --tokens 20000 --hidden 256

"before" is one forward over the whole input with a [T, T] mask per attention kind (what the
backend did for every prompt); "after" is the backend's prefill, `--chunk` tokens at a time
into a KV cache, with the fused kernel's causal mode where no row is padded. For a random
Llama and a random Gemma 2 (sliding window and softcapped attention) it measures the
next-token logits of one prompt and the per-row summaries of one text: seconds (median of
--reps) and peak memory, with after/before ratios from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from pertoken.backends.mlx import MLXBackend
from pertoken.backends.mlx.batch import full_pass, ids_of, window_of
from pertoken.backends.mlx.prefill import prefill
from pertoken.backends.mlx.summaries import summarize
from pertoken.backends.plan import PaddedBatch, left_pad


def random_checkpoint(arch: str, hidden: int, folder: Path, vocab: int = 1024) -> Path:
    """A random 4-layer checkpoint with a word-level tokenizer (`t{i}` is token i)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    heads = max(4, hidden // 64)
    shape = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=4,
        num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=32768,
    )  # fmt: skip
    torch.manual_seed(0)
    if arch == "gemma2":
        config = Gemma2Config(**shape, head_dim=64, sliding_window=1024, query_pre_attn_scalar=64)
        Gemma2ForCausalLM(config).save_pretrained(folder)
    else:
        LlamaForCausalLM(LlamaConfig(**shape, rope_theta=500000.0)).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), pad_token="t0", eos_token="t1"
    )
    fast.save_pretrained(folder)
    return folder


def one_pass_logits(model, batch: PaddedBatch) -> mx.array:
    return model(ids_of(batch), None, full_pass(batch, window_of(model), head="last"))


def one_pass_summaries(model, batch: PaddedBatch) -> mx.array:
    w = mx.array(batch.summary_weights())  # [B, 3, T]
    acc = {}

    def observe(row: int, h: mx.array) -> None:
        acc[row] = w @ h.astype(mx.float32)  # [B, 3, hidden]

    model(ids_of(batch), None, full_pass(batch, window_of(model), head="none", observe=observe))
    return mx.stack([acc[r] for r in sorted(acc)], axis=1)


def timed(fn, reps: int) -> tuple[float, float]:
    """(median seconds, peak MB) of `fn`, evaluated to the end."""
    times, peak = [], 0.0
    for _ in range(reps):
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        out = fn()
        mx.eval(out) if out is not None else None
        times.append(time.perf_counter() - t0)
        peak = max(peak, mx.get_peak_memory() / 2**20)
    return statistics.median(times), peak


def rows_for(arch: str, args) -> list[tuple]:
    folder = random_checkpoint(arch, args.hidden, Path(tempfile.mkdtemp()) / f"random-{arch}")
    b = MLXBackend.load(str(folder), dtype="float32", device="cpu")
    ids = np.random.default_rng(0).integers(2, 1024, args.tokens).tolist()
    batch = left_pad([ids], 0, prompt_lens=[args.tokens // 2])
    m, c = b.model, args.chunk
    cases = {
        "next-token logits": (
            lambda: one_pass_logits(m, batch),
            lambda: prefill(m, batch, chunk=c, head="last"),
        ),
        "summaries": (
            lambda: one_pass_summaries(m, batch),
            lambda: mx.array(summarize(m, batch, c)),
        ),
    }
    out = []
    for what, (before, after) in cases.items():
        before(), after()  # warm-up
        out.append((arch, what, timed(before, args.reps), timed(after, args.reps)))
    return out


def table(rows, args) -> str:
    lines = [
        f"{args.tokens} tokens, hidden {args.hidden}, 4 layers, float32, CPU, chunk {args.chunk}",
        "| model | measure | before s | after s | time after/before "
        "| before peak MB | after peak MB | memory after/before |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arch, what, (t0, m0), (t1, m1) in rows:
        lines.append(
            f"| {arch} | {what} | {t0:.2f} | {t1:.2f} | {t1 / t0:.2f}x "
            f"| {m0:.0f} | {m1:.0f} | {m1 / m0:.2f}x |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    rows = [r for arch in ("llama", "gemma2") for r in rows_for(arch, args)]
    print(table(rows, args))


if __name__ == "__main__":
    main()
