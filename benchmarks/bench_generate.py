"""Sampled generation with a realistic spread of answer lengths, on both backends, in one run.

    python benchmarks/bench_generate.py                       # random Llama, both backends
    python benchmarks/bench_generate.py --backends torch --random 512x8 --prompts 64

Sampled answers (temperature 1) run from a few tokens to the max_new_tokens cap, which is what
makes a static batch idle: every batch runs until its longest answer ends. Here a random model
is made to end each answer at a length drawn per prompt from a log-normal distribution capped at
max_new_tokens: stop tokens are suppressed before that step and forced at it, by a hook on the
model's logits that knows each slot's prompt from the tokens it feeds, in any batch or slot
(pertoken), or by mlx-lm's per-prompt `max_tokens` (mlx-lm, which never sees a stop token
here). Every method therefore writes the same number of tokens per prompt, and the table
reports useful tokens/s (answer tokens over wall time, median of --reps after a warm-up,
methods interleaved), each method's ratio to pertoken's static batches on the same backend,
and the COMPARE ratios below it (continuous vs static, pertoken MLX vs mlx-lm).

A method is one function `(Setup, Workload) -> answer tokens written`, listed in METHODS under
its backend.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EOS, PAD = 1, 0  # the only stop token of the random model, and its padding


def word(i: int) -> str:
    """Token i's word. Special tokens get names that no other word contains: transformers
    matches them inside words, so an eos named `t1` would split `t14` into two tokens."""
    return {PAD: "<pad>", EOS: "<eos>"}.get(i, f"w{i}")


def random_llama(hidden: int, layers: int, folder: Path, vocab: int = 1024) -> Path:
    """A random Llama-3-style checkpoint with a word-level tokenizer (`word(i)` is token i)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    heads = max(4, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False,
        eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({word(i): i for i in range(vocab)}, unk_token=word(PAD)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), pad_token=word(PAD), eos_token=word(EOS)
    )
    fast.save_pretrained(folder)
    return folder


@dataclass
class Workload:
    """Prompts whose first token tags them (id 2 + index) and the answer length of each."""

    ids: list[list[int]]
    lengths: np.ndarray  # [N] answer tokens each prompt must get
    max_new_tokens: int
    batch_size: int
    seed: int

    @property
    def texts(self) -> list[str]:
        return [" ".join(map(word, s)) for s in self.ids]

    def static_efficiency(self) -> float:
        """Useful tokens over the slots x steps of static batches (sorted by prompt length, as
        pertoken batches them): the share of decode work a static batch does not waste."""
        order = np.argsort([len(s) for s in self.ids], kind="stable")
        lens, B = self.lengths[order], self.batch_size
        steps = sum(
            len(lens[i : i + B]) * (lens[i : i + B].max() + 1) for i in range(0, len(lens), B)
        )
        return float(self.lengths.sum() / steps)


def draw_workload(args, vocab: int) -> Workload:
    """Log-normal answer lengths (median `--median` x cap, sigma `--sigma`), capped at the cap."""
    rng = np.random.default_rng(args.seed)
    n, cap = args.prompts, args.max_new_tokens
    assert n <= vocab - 2, "each prompt needs its own tag token"
    lengths = rng.lognormal(np.log(args.median * cap), args.sigma, n)
    lengths = np.clip(np.round(lengths), 1, cap).astype(np.int64)
    plens = rng.integers(args.prompt_len // 2, args.prompt_len + 1, n)
    ids = [[2 + i, *rng.integers(2, vocab, p - 1).tolist()] for i, p in enumerate(plens)]
    return Workload(ids, lengths, cap, args.batch_size, args.seed)


def torch_forced(model, w: Workload):
    """A forward hook on a transformers model that ends each prompt's answer at its drawn
    length, whatever batching or slot the prompt runs in. Prompt i's answer tokens are drawn
    (at temperature 1) from its own class of token ids, those congruent to 2 + i modulo the
    number of prompts, so each slot's prompt is its tag token (the first non-pad one) at
    prefill and the token it feeds while decoding; its position says how many answer tokens it
    has drawn. The stop token is suppressed before the drawn length and forced at it."""
    import torch

    target, plen = torch.tensor(w.lengths), torch.tensor([len(s) for s in w.ids])
    M, vocab = len(w.ids), model.config.vocab_size
    other = ((torch.arange(vocab) - 2) % M)[None] != torch.arange(M)[:, None]  # [M, vocab]
    other[:, [PAD, EOS]] = True

    def hook(_module, _args, kwargs, out):
        ids, pos = kwargs["input_ids"], kwargs["position_ids"]  # [B, T]
        first = ids.gather(1, (ids != PAD).float().argmax(1, keepdim=True))[:, 0]
        prompt = ((first if ids.shape[1] > 1 else ids[:, 0]) - 2) % M  # [B] prompt of each slot
        drawn = pos[:, -1] - plen[prompt] + 1  # [B] answer tokens drawn before this one
        last = out.logits[:, -1]  # [B, vocab], edited in place
        last.masked_fill_(other[prompt], -1e9)
        last[:, EOS] = torch.where(drawn == target[prompt], 1e9, -1e9)
        return out

    return model.register_forward_hook(hook, with_kwargs=True)


class MLXForced:
    """pertoken's MLX model with the same stop control as `torch_forced` on its last logits
    (positions from the Pass's offsets); every other attribute passes through to the model."""

    def __init__(self, model, w: Workload, vocab: int):
        import mlx.core as mx

        self.inner, M = model, len(w.ids)
        self.M, self.target = M, mx.array(w.lengths)
        self.plen = mx.array([len(s) for s in w.ids])
        other = ((np.arange(vocab) - 2) % M)[None] != np.arange(M)[:, None]  # [M, vocab]
        other[:, [PAD, EOS]] = True
        self.other = mx.array(other)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, ids, cache=None, p=None):
        import mlx.core as mx

        logits = self.inner(ids, cache, p)  # [B, T or 1, vocab], or None
        if logits is None:
            return None
        # on the device, so the host never waits for the tokens a step is fed
        lead = mx.argmax((ids != PAD).astype(mx.int32), axis=1)  # [B] first real token
        first = (
            mx.take_along_axis(ids, lead[:, None], axis=1)[:, 0] if ids.shape[1] > 1 else ids[:, 0]
        )
        prompt = (first - 2) % self.M  # [B] prompt of each slot
        pos = mx.array(p.offset) + ids.shape[1] - 1  # [B] position of the last input
        drawn = pos - self.plen[prompt] + 1  # [B] answer tokens drawn before this one
        last = mx.where(self.other[prompt], -1e9, logits[:, -1].astype(mx.float32))  # [B, vocab]
        eos = mx.where(drawn == self.target[prompt], 1e9, -1e9)[:, None]
        last = mx.where(mx.arange(last.shape[-1])[None] == EOS, eos, last)
        return mx.concatenate([logits[:, :-1], last[:, None].astype(logits.dtype)], axis=1)


@dataclass
class Setup:
    folder: Path
    dtype: str
    cache: dict  # loaded models, by method


def pertoken_torch(setup: Setup, w: Workload, compile=False) -> int:
    from pertoken.backends.torch import TorchBackend

    key = f"torch-{compile}"
    if key not in setup.cache:
        b = TorchBackend.load(str(setup.folder), dtype=setup.dtype, device="cpu", compile=compile)
        torch_forced(b.model, w)
        setup.cache[key] = b
    b = setup.cache[key]
    answers = b.generate(
        w.texts, max_new_tokens=w.max_new_tokens, temperature=1.0, seed=w.seed,
        batch_size=w.batch_size,
    )  # fmt: skip
    return sum(len(b.encode(a)) for a in answers)


def pertoken_torch_compiled(setup: Setup, w: Workload) -> int:
    return pertoken_torch(setup, w, compile=True)


def pertoken_mlx(setup: Setup, w: Workload) -> int:
    from pertoken.backends.mlx import MLXBackend

    if "mlx" not in setup.cache:
        b = MLXBackend.load(str(setup.folder), dtype=setup.dtype)
        b.model = MLXForced(b.model, w, b.config["vocab_size"])
        setup.cache["mlx"] = b
    b = setup.cache["mlx"]
    answers = b.generate(
        w.texts, max_new_tokens=w.max_new_tokens, temperature=1.0, seed=w.seed,
        batch_size=w.batch_size,
    )  # fmt: skip
    return sum(len(b.encode(a)) for a in answers)


def mlx_lm_batch_generate(setup: Setup, w: Workload) -> int:
    import mlx.core as mx
    from mlx_lm import batch_generate
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.sample_utils import make_sampler

    from pertoken.backends.mlx.load import DTYPES

    if "mlx-lm" not in setup.cache:
        model, tok = mlx_lm_load(str(setup.folder))
        model.set_dtype(DTYPES[setup.dtype])
        tok._eos_token_ids = set()  # lengths come from max_tokens per prompt
        setup.cache["mlx-lm"] = model, tok
    model, tok = setup.cache["mlx-lm"]
    mx.random.seed(w.seed)
    out = batch_generate(
        model, tok, w.ids, max_tokens=w.lengths.tolist(), return_token_ids=True,
        sampler=make_sampler(temp=1.0), completion_batch_size=w.batch_size,
        prefill_batch_size=w.batch_size,
    )  # fmt: skip
    return sum(len(t) for t in out.token_ids)


Method = Callable[[Setup, Workload], int]
# backend -> (method name, function); the first of each backend is the baseline of its ratios
METHODS: dict[str, list[tuple[str, Method]]] = {
    "torch": [
        ("pertoken continuous", pertoken_torch),
        ("pertoken continuous, compiled step", pertoken_torch_compiled),
    ],
    "mlx": [
        ("mlx-lm batch_generate", mlx_lm_batch_generate),
        ("pertoken continuous", pertoken_mlx),
    ],
}
# (backend, method, reference): ratios printed under the table, from the same run
COMPARE = [
    ("torch", "pertoken continuous, compiled step", "pertoken continuous"),
    ("mlx", "pertoken continuous", "mlx-lm batch_generate"),
]


def rates(methods: list[tuple[str, Method]], setup: Setup, w: Workload, reps: int) -> list:
    """(name, useful tok/s) per method: one warm-up each, then `reps` interleaved runs."""
    want = int(w.lengths.sum())
    for name, fn in methods:
        got = fn(setup, w)
        assert got == want, f"{name} wrote {got} answer tokens, the workload asks for {want}"
    times = {name: [] for name, _ in methods}
    for _ in range(reps):
        for name, fn in methods:
            t0 = time.perf_counter()
            fn(setup, w)
            times[name].append(time.perf_counter() - t0)
    return [(name, want / statistics.median(times[name])) for name, _ in methods]


def table(results: dict[str, list], w: Workload) -> str:
    lines = [
        "| backend | method | useful tok/s | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for backend, rows in results.items():
        base = rows[0][1]
        for name, tps in rows:
            lines.append(f"| {backend} | {name} | {tps:.1f} | {tps / base:.2f}x |")
    q = np.percentile(w.lengths, [10, 50, 90])
    head = (
        f"{len(w.ids)} prompts, batch {w.batch_size}, answer lengths p10/p50/p90/max "
        f"{q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f}/{w.lengths.max()} of cap {w.max_new_tokens} "
        f"(mean {w.lengths.mean():.0f}); static batches do "
        f"{100 * w.static_efficiency():.0f}% useful decode work"
    )
    ratios = [
        f"{backend}: {a} / {b} = {dict(results[backend])[a] / dict(results[backend])[b]:.2f}x"
        for backend, a, b in COMPARE
        if backend in results
    ]
    return head + "\n" + "\n".join(lines + [""] + ratios)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="torch,mlx")
    ap.add_argument("--random", default="128x4", help="HIDDENxLAYERS of the random Llama")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32, help="longest prompt (half is shortest)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--median", type=float, default=0.15, help="median length / cap")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal spread")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--torch-threads", type=int, default=1, help="a small model gains nothing from more"
    )
    args = ap.parse_args()
    if "torch" in args.backends:
        import torch

        torch.set_num_threads(args.torch_threads)
    hidden, layers = (int(x) for x in args.random.lower().split("x"))
    folder = random_llama(hidden, layers, Path(tempfile.mkdtemp()) / "random-llama")
    w = draw_workload(args, vocab=1024)
    setup = Setup(folder, args.dtype, {})
    results = {b: rates(METHODS[b], setup, w, args.reps) for b in args.backends.split(",")}
    threads = f"torch on {args.torch_threads} thread(s)"
    print(f"model: random llama {args.random} ({args.dtype}, cpu; {threads})")
    print(table(results, w))


if __name__ == "__main__":
    main()
