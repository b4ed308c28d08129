"""pertoken's torch backend against transformers on full-size random models, in one run.

    python benchmarks/bench_cuda.py --out bench_cuda.json          # CUDA: Llama-3.1-8B, Gemma-2-9B
    python benchmarks/bench_cuda.py --tiny                          # CPU self-check, tiny configs

Measures, median of --reps after a warm-up: (a) steered batched generation, pertoken vs HF
generate with a steering hook, at batch 1/32/128; (b) the compiled decode step (static cache,
CUDA graph; `compile=True`), steered with three rows captured at every token, at batch 1/32,
with the seconds its capture took; (c) extraction (`summaries`) vs one sequence at a time with
output_hidden_states; (d) the bandwidth and compute floors; plus correctness (bf16 vs a float32
reference, batched == single, compiled == eager). Prints one table with the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pertoken.backends.base import Sampling, Steer, Streaming
from pertoken.backends.torch import TorchBackend

LLAMA_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
GEMMA2_9B = dict(
    model_type="gemma2",
    vocab_size=256000,
    hidden_size=3584,
    intermediate_size=14336,
    num_hidden_layers=42,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    sliding_window=4096,
    query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    max_position_embeddings=8192,
)
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def word_tokenizer(vocab_size: int, folder: Path):
    """A tokenizer whose words `t{i}` are token ids, so prompts of chosen ids are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), pad_token="t0", eos_token="t1"
    )


def build(spec: dict, *, tiny: bool, device: str, dtype: torch.dtype) -> TorchBackend:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**spec, **(TINY | ({"head_dim": 16} if "head_dim" in spec else {}) if tiny else {})}
    config = AutoConfig.for_model(**spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    tok = word_tokenizer(config.vocab_size, Path(tempfile.mkdtemp()))
    name = str(torch.finfo(dtype).dtype) if hasattr(torch.finfo(dtype), "dtype") else str(dtype)
    b = TorchBackend(model, tok, model_id=spec["model_type"], dtype=name, device=device)
    b.stop_ids = torch.tensor([-1], device=device)  # random weights: always run to length
    return b


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"t{i}" for i in rng.integers(2, vocab, length)) for _ in range(n)]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_generate(b: TorchBackend, prompts: list[str], new: int, vec, row: int):
    """transformers' generate with a Python steering hook, as upstream steers."""
    ids = b.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(b.device)
    layer = b.model.get_decoder().layers[row - 1]
    handle = layer.register_forward_hook(lambda m, a, out: out + vec.to(out.dtype))
    try:
        b.model.generate(
            **ids,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=True,
            pad_token_id=b.pad_id,
            eos_token_id=None,
        )
    finally:
        handle.remove()


def compiled_backend(b: TorchBackend) -> TorchBackend:
    """The same model behind a backend with the compiled decode step."""
    c = TorchBackend(b.model, b.tokenizer, model_id=b.model_id, dtype=b.dtype, device=b.device,
                     compile=True)  # fmt: skip
    c.stop_ids = b.stop_ids
    return c


def compiled_generate(c: TorchBackend, prompts: list[str], new: int, steer, rows) -> None:
    """Sampled generation through the compiled step, steered, with the states of `rows` at
    every answer token reported (what a per-token monitor reads)."""
    kept = []
    stream = Streaming(kept.append, rows=list(rows))
    c.generate(prompts, max_new_tokens=new, sampling=Sampling(1.0), steer=steer, stream=stream,
               batch_size=len(prompts))  # fmt: skip
    assert all(s.hidden is not None for s in kept)


def one_at_a_time(b: TorchBackend, texts: list[str]):
    for t in texts:
        ids = b.tokenizer(t, return_tensors="pt").input_ids.to(b.device)
        with torch.no_grad():
            out = b.model(input_ids=ids, output_hidden_states=True)
        [h.float().mean(1).cpu() for h in out.hidden_states]


def copy_bandwidth(device: str) -> float:
    """Bytes moved per second by a device-to-device copy (read + write)."""
    x = torch.empty(2**28 if device == "cuda" else 2**24, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), 5)
    return 2 * x.numel() / t


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(name: str, spec: dict, args) -> dict:
    dtype = torch.float32 if args.tiny else torch.bfloat16
    b = build(spec, tiny=args.tiny, device=args.device, dtype=dtype)
    vocab, row = b.model.config.vocab_size, b.n_layers // 2
    vec = torch.randn(b.hidden_size, device=args.device) * 0.1
    steer = Steer.single(row, vec.float().cpu().numpy(), 1.0, positions="response")
    res = {"model": name, "params": sum(p.numel() for p in b.model.parameters())}
    bw = copy_bandwidth(args.device)
    res["bandwidth_GBps"] = bw / 1e9
    for batch in args.batches:
        ps = random_prompts(batch, args.prompt_len, vocab, batch)
        kv = _kv_bytes(b.model.config, batch, args.prompt_len + args.new_tokens // 2, dtype)
        res[f"floor_tps_b{batch}"] = batch * bw / (param_bytes(b.model) + kv)
        res[f"hf_tps_b{batch}"] = (
            batch
            * args.new_tokens
            / median_time(lambda ps=ps: hf_generate(b, ps, args.new_tokens, vec, row), args.reps)
        )
        for label, s in (("pt_plain", None), ("pt_steer", steer)):
            res[f"{label}_tps_b{batch}"] = (
                batch
                * args.new_tokens
                / median_time(
                    lambda ps=ps, s=s, batch=batch: b.generate(
                        ps, max_new_tokens=args.new_tokens, steer=s, batch_size=batch
                    ),
                    args.reps,
                )
            )
    res |= _compiled(b, vocab, row, steer, args)
    texts = random_prompts(args.extract_n, args.extract_len, vocab, 7)
    half = [" ".join(t.split()[: args.extract_len // 2]) for t in texts]
    rest = [t[len(h) :] for t, h in zip(texts, half)]
    res["extract_sps_one"] = len(texts) / median_time(lambda: one_at_a_time(b, texts), args.reps)
    res["extract_sps_pertoken"] = len(texts) / median_time(
        lambda: b.summaries(half, rest, batch_size=args.extract_batch), args.reps
    )
    flops = 2 * _body_params(b.model) * args.extract_len
    res["extract_floor_sps"] = args.peak_tflops * 1e12 / flops
    res["batched_equals_single"] = _batched_equals_single(b, vocab)
    res["bf16_vs_fp32_max_rel"] = _precision(spec, args) if not args.tiny else None
    return res


def _compiled(b: TorchBackend, vocab: int, row: int, steer: Steer, args) -> dict:
    """tok/s of the compiled step, steered and capturing three rows, and its warm-up seconds."""
    c, res = compiled_backend(b), {}
    rows = sorted({1, row, b.n_layers})
    ps = random_prompts(4, 24, vocab, 11)
    ps = [p[: len(p) - 3 * i] for i, p in enumerate(ps)]
    greedy = dict(max_new_tokens=8, temperature=0, batch_size=4)
    res["compiled_equals_eager"] = c.generate(ps, **greedy) == b.generate(ps, **greedy)
    for batch in args.compiled_batches:
        ps = random_prompts(batch, args.prompt_len, vocab, batch)
        before = c.compiled.warmup_seconds
        t = median_time(lambda ps=ps: compiled_generate(c, ps, args.new_tokens, steer, rows),
                        args.reps)  # fmt: skip
        res[f"compiled_tps_b{batch}"] = batch * args.new_tokens / t
        res[f"compiled_warmup_s_b{batch}"] = c.compiled.warmup_seconds - before
    res["compiled_rows"] = len(rows)
    return res


def _kv_bytes(config, batch: int, seq: int, dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_tok = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return per_tok * seq * batch * torch.finfo(dtype).bits // 8


def _body_params(model) -> int:
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def _batched_equals_single(b: TorchBackend, vocab: int) -> bool:
    ps = random_prompts(4, 24, vocab, 11)
    ps = [p[: len(p) - 3 * i] for i, p in enumerate(ps)]  # uneven lengths: real padding
    many = b.generate(ps, max_new_tokens=8, temperature=0, batch_size=4)
    return many == [b.generate([p], max_new_tokens=8, temperature=0)[0] for p in ps]


def _precision(spec: dict, args) -> float:
    """Max relative error per row of bf16 summaries vs a float32 copy of the same weights."""
    b = build(spec, tiny=False, device=args.device, dtype=torch.float32)
    texts = random_prompts(2, 64, b.model.config.vocab_size, 5)
    ref = b.summaries(texts, [" t5 t6 t7"] * 2).response_avg
    b.model.to(torch.bfloat16)
    got = b.summaries(texts, [" t5 t6 t7"] * 2).response_avg
    del b
    torch.cuda.empty_cache()
    return float((np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).max())


def table(results: list[dict], batches) -> str:
    lines = [
        "| model | measure | pertoken | baseline | ratio | floor | % of floor |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for batch in batches:
            pt, hf, fl = (
                r[f"pt_steer_tps_b{batch}"],
                r[f"hf_tps_b{batch}"],
                r[f"floor_tps_b{batch}"],
            )
            lines.append(
                f"| {r['model']} | steered gen tok/s, batch {batch} | {pt:.0f} | {hf:.0f} "
                f"(HF+hook) | {pt / hf:.2f}x | {fl:.0f} | {100 * pt / fl:.0f}% |"
            )
            plain = r[f"pt_plain_tps_b{batch}"]
            lines.append(
                f"| {r['model']} | steering overhead, batch {batch} | {pt:.0f} | "
                f"{plain:.0f} (unsteered) | {pt / plain:.2f}x | | |"
            )
        lines += _compiled_lines(r, batches)
        pt, one, fl = r["extract_sps_pertoken"], r["extract_sps_one"], r["extract_floor_sps"]
        lines.append(
            f"| {r['model']} | extraction seq/s | {pt:.1f} | {one:.1f} (one at a time) "
            f"| {pt / one:.2f}x | {fl:.0f} | {100 * pt / fl:.0f}% |"
        )
        lines.append(f"| {r['model']} | batched == single | {r['batched_equals_single']} | | | | |")
    return "\n".join(lines)


def _compiled_lines(r: dict, batches) -> list[str]:
    lines = []
    for batch in sorted(int(k.rsplit("b", 1)[1]) for k in r if k.startswith("compiled_tps_b")):
        pt, fl = r[f"compiled_tps_b{batch}"], r.get(f"floor_tps_b{batch}")
        hf = r.get(f"hf_tps_b{batch}")
        base = f"{hf:.0f} (HF+hook) | {pt / hf:.2f}x" if hf else "| "
        floor = f"{fl:.0f} | {100 * pt / fl:.0f}%" if fl else "| "
        lines.append(
            f"| {r['model']} | compiled, steered + {r['compiled_rows']} rows captured, batch "
            f"{batch} (warm-up {r[f'compiled_warmup_s_b{batch}']:.1f}s) | {pt:.0f} | {base} "
            f"| {floor} |"
        )
    lines.append(f"| {r['model']} | compiled == eager | {r['compiled_equals_eager']} | | | | |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (self-check)")
    ap.add_argument("--models", default="llama,gemma2")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--compiled-batches", default="1,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--extract-n", type=int, default=64)
    ap.add_argument("--extract-len", type=int, default=256)
    ap.add_argument("--extract-batch", type=int, default=32)
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    args.device = "cpu" if args.tiny else "cuda"
    args.batches = [int(x) for x in args.batches.split(",")]
    args.compiled_batches = [int(x) for x in args.compiled_batches.split(",")]
    if args.tiny:
        args.prompt_len, args.new_tokens, args.extract_n, args.extract_len = 16, 8, 8, 32
        args.batches, args.compiled_batches, args.reps = [1, 4], [1, 4], 1
    specs = {"llama": LLAMA_8B, "gemma2": GEMMA2_9B}
    results = [measure(m, specs[m], args) for m in args.models.split(",")]
    print(table(results, args.batches))
    if args.out:
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "transformers": __import__("transformers").__version__,
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
