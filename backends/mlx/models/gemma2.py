"""Gemma 2 with native steering and capture, a real sliding window and batched masks.

Attribute names follow mlx-lm's `models/gemma2.py`, so its checkpoints load unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from pertoken.backends.mlx.models.config import layer_types, rope_settings
from pertoken.backends.mlx.models.residual import Pass, run_blocks


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    num_key_value_heads: int
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    query_pre_attn_scalar: float = 144.0
    sliding_window: int | None = 4096
    layer_types: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, params: dict) -> ModelArgs:
        args = super().from_dict(params)
        args.rope_theta, _ = rope_settings(params)
        args.layer_types = layer_types(params, args.num_hidden_layers)
        return args


class RMSNorm(nn.Module):
    """Gemma's norm scales by (1 + weight)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


def softcap(x: mx.array, cap: float | None) -> mx.array:
    return x if cap is None else mx.tanh(x / cap) * cap


def causal_mask(L: int, S: int) -> mx.array:
    """[1, 1, L, S] bool: the last L of S positions see themselves and what precedes them."""
    q = mx.arange(S - L, S)[:, None]  # [L, 1]
    return (mx.arange(S)[None] <= q)[None, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.repeats = self.n_heads // self.n_kv_heads
        self.scale = args.query_pre_attn_scalar**-0.5
        self.softcap = args.attn_logit_softcapping
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=False)
        self.rope = nn.RoPE(hd, traditional=args.rope_traditional, base=args.rope_theta)

    def __call__(self, x: mx.array, mask, cache, offset) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, kv_heads, S, head_dim]
        # Group query heads by their KV head: [B, kv_heads, repeats, L, head_dim].
        q = (q * self.scale).reshape(B, self.n_kv_heads, self.repeats, L, -1)
        scores = softcap(q @ mx.expand_dims(k, 2).swapaxes(-1, -2), self.softcap)
        if isinstance(mask, str):  # "causal": the softcap rules out the fused kernel
            mask = causal_mask(L, k.shape[2])
        if mask is not None:  # [B, 1, L, S] -> [B, 1, 1, L, S], one mask per slot
            low = mx.array(mx.finfo(scores.dtype).min, scores.dtype)
            scores = mx.where(mx.expand_dims(mask, 2), scores, low)
        weights = mx.softmax(scores, axis=-1, precise=True)
        out = (weights @ mx.expand_dims(v, 2)).reshape(B, self.n_heads, L, -1)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, use_sliding: bool):
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.use_sliding = use_sliding
        self.self_attn = Attention(args)
        self.mlp = MLP(dim, args.intermediate_size)
        self.input_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def __call__(self, x: mx.array, mask, cache, offset) -> mx.array:
        r = self.self_attn(self.input_layernorm(x), mask, cache, offset)
        h = x + self.post_attention_layernorm(r)
        r = self.mlp(self.pre_feedforward_layernorm(h))
        return h + self.post_feedforward_layernorm(r)


class GemmaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden_size = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            TransformerBlock(args, use_sliding=t == "sliding_attention") for t in args.layer_types
        ]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache, p: Pass) -> mx.array:
        h = self.embed_tokens(inputs)  # [B, L, hidden]
        # The scale is rounded to the model dtype first, as transformers does.
        h = h * mx.array(self.hidden_size**0.5, dtype=h.dtype)
        return run_blocks(self.layers, self.norm, h, cache, p)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = GemmaModel(args)

    def __call__(self, inputs: mx.array, cache=None, p: Pass | None = None) -> mx.array | None:
        p = p or Pass()
        h = self.model(inputs, cache, p)
        if isinstance(p.head, str) and p.head == "none":
            return None
        h = p.kept(h)
        out = self.model.embed_tokens.as_linear(h)  # [B, L, vocab]
        return softcap(out, self.args.final_logit_softcapping)

    @property
    def layers(self):
        return self.model.layers

    @property
    def sliding_window(self) -> int | None:
        return self.args.sliding_window

    def sanitize(self, weights: dict) -> dict:
        return {k: v for k, v in weights.items() if k != "lm_head.weight"}
