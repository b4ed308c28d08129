"""The Llama family (Llama 3.x, Qwen 2.x, Mistral) with native steering and capture.

Attribute names follow mlx-lm's `models/llama.py`, so its checkpoints, quantized ones included,
load unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.rope_utils import initialize_rope

from pertoken.backends.mlx.models.config import layer_types, rope_settings
from pertoken.backends.mlx.models.residual import Pass, run_blocks


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    num_key_value_heads: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, params: dict) -> ModelArgs:
        args = super().from_dict(params)
        args.rope_theta, args.rope_scaling = rope_settings(params)
        args.layer_types = layer_types(params, args.num_hidden_layers)
        args.num_key_value_heads = args.num_key_value_heads or args.num_attention_heads
        args.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        return args

    @property
    def qkv_bias(self) -> bool:
        # Qwen 2 has biases on q, k and v but not on o.
        return self.attention_bias or self.model_type == "qwen2"


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=args.attention_bias)
        self.rope = initialize_rope(
            hd, args.rope_theta, args.rope_traditional, args.rope_scaling,
            args.max_position_embeddings,
        )  # fmt: skip

    def __call__(self, x: mx.array, mask, cache, offset) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, kv_heads, S, head_dim]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, use_sliding: bool):
        super().__init__()
        self.use_sliding = use_sliding
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache, offset) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, offset)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            TransformerBlock(args, use_sliding=t == "sliding_attention") for t in args.layer_types
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache, p: Pass) -> mx.array:
        h = self.embed_tokens(inputs)  # [B, L, hidden]
        return run_blocks(self.layers, self.norm, h, cache, p)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, p: Pass | None = None) -> mx.array | None:
        p = p or Pass()
        h = self.model(inputs, cache, p)
        if isinstance(p.head, str) and p.head == "none":
            return None
        h = p.kept(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)  # [B, L, vocab]

    @property
    def layers(self):
        return self.model.layers

    @property
    def sliding_window(self) -> int | None:
        return self.args.sliding_window

    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
