"""GGUF weights into pertoken's MLX models: quantised where MLX reads the type natively.

MLX's own GGUF reader keeps Q4_0, Q4_1 and Q8_0 as its affine quantisation (group 32, the
same numbers); a file holding any other quantisation is dequantised to float with gguf-py."""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

NATIVE = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}
GROUP = 32  # GGUF's block size, also MLX's group size for these files

_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def tensor_types(path: Path) -> set[str]:
    import gguf

    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def read_weights(path: Path) -> tuple[dict[str, mx.array], bool]:
    """(GGUF-named arrays, whether they are natively quantised)."""
    if tensor_types(path) <= NATIVE:
        return mx.load(str(path)), True
    return _dequantised(path), False


def _dequantised(path: Path) -> dict[str, mx.array]:
    import gguf

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy, rows first
        out[t.name] = mx.array(np.asarray(arr, dtype=np.float32))
    return out


def hf_names(weights: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """Hugging Face Llama names; q and k rows un-permuted where llama.cpp permuted them."""
    out = {}
    for name, w in weights.items():
        if name == "rope_freqs.weight":  # llama 3 rope scaling lives in the config
            continue
        hf = _hf_name(name)
        if config.get("model_type") == "llama" and re.search(r"attn_[qk]\.", name):
            heads = config["num_attention_heads"] if ".attn_q." in name else _kv_heads(config)
            w = _unpermute(w, heads)
        out[hf] = w
    return out


def _hf_name(name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(\w+)", name)
    if m:
        return f"model.layers.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"
    base, suffix = name.rsplit(".", 1)
    return f"{_TOP[base]}.{suffix}"


def _kv_heads(config: dict) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def _unpermute(w: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's rotary row order (pairs interleaved per head) on any row-first array."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def quantize_like(net: nn.Module, weights: dict[str, mx.array]) -> None:
    """Turn the layers whose weights arrive quantised into MLX quantised layers (bits read from
    the packed width: Q4 -> 4, Q8 -> 8)."""

    def predicate(path: str, module: nn.Module):
        scales = weights.get(f"{path}.scales")
        if scales is None:
            return False
        bits = weights[f"{path}.weight"].shape[-1] * 32 // (scales.shape[-1] * GROUP)
        return {"group_size": GROUP, "bits": int(bits)}

    nn.quantize(net, class_predicate=predicate)
