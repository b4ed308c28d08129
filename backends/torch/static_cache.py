"""A preallocated KV cache and attention masks driven by device tensors.

Every forward writes its keys and values at the cache slots named by a tensor, and the masks are
built from the position each slot holds, so a decode step has the same shapes and memory
addresses from one token to the next: what a CUDA graph or torch.compile needs. Sliding-window
layers keep the full length and apply their window in the mask.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from pertoken.errors import PertokenError

ATTENTION = ("sdpa", "eager")  # implementations that take a 4-D mask from the caller


class SlotLayer(CacheLayerMixin):
    """One block's keys and values, [B, kv_heads, length, head_dim], written at `owner.slots`."""

    is_compileable = True

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, _ = key_states.shape
        L = self.owner.length
        self.keys = key_states.new_zeros(B, H, L, key_states.shape[-1])
        self.values = value_states.new_zeros(B, H, L, value_states.shape[-1])
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, T, _ = key_states.shape
        # the block may sit on another device than the slots (a sharded model)
        idx = self.owner.slots.to(self.device, non_blocking=True)[:, None, :, None]  # [B,1,T,1]
        self.keys.scatter_(2, idx.expand(B, H, T, self.keys.shape[-1]), key_states)
        self.values.scatter_(2, idx.expand(B, H, T, self.values.shape[-1]), value_states)
        n = self.owner.used
        return self.keys[:, :, :n], self.values[:, :, :n]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.used, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.owner.length


class SlotCache(Cache):
    """The KV cache of a whole model: `slots` [B, T] says where the next forward writes;
    attention reads the first `used` slots (all of them in a captured graph, whose shapes
    are fixed; a plain step reads only up to the furthest slot written, as a dynamic cache)."""

    def __init__(self, n_layers: int, length: int):
        self.length = self.used = length
        self.slots: torch.Tensor | None = None
        super().__init__(layers=[SlotLayer(self) for _ in range(n_layers)])

    def first(self, w: int) -> SlotCache:
        """The same cache over slots 0..w-1: its keys and values are views of this one's."""
        view = SlotCache(len(self.layers), self.length)
        for mine, theirs in zip(view.layers, self.layers, strict=True):
            if theirs.is_initialized:
                mine.keys, mine.values = theirs.keys[:w], theirs.values[:w]
                mine.device, mine.is_initialized = theirs.device, True
        return view


def check_attention(config) -> str:
    """The model's attention implementation, when the static step can drive its masks."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ATTENTION:
        raise PertokenError(
            f"the compiled decode step needs sdpa or eager attention, but this model uses {impl}: "
            "load it without --compile"
        )
    return impl


def attention_masks(
    config, key_pos: torch.Tensor, q_pos: torch.Tensor, q_slot: torch.Tensor, dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """What the model's forward takes as `attention_mask`: one 4-D mask [B, 1, T, length], or
    one per attention type for models that mix full and sliding-window layers.

    key_pos [B, length]: the position held by each slot (-1: empty or padding);
    q_pos, q_slot [B, T]: each query's position and slot. Each query always sees its own slot,
    so a padding slot never has an empty softmax (its output is never used)."""
    L = key_pos.shape[1]
    k = key_pos[:, None, None, :]  # [B, 1, 1, L]
    q = q_pos[:, None, :, None]  # [B, 1, T, 1]
    own = torch.arange(L, device=key_pos.device) == q_slot[:, None, :, None]  # [B, 1, T, L]
    seen = (k >= 0) & (k <= q)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:  # one mask for every layer (Llama; Mistral with its window)
        mask = seen & (k > q - window) if window else seen
        return _as_mask(config, mask | own, dtype)
    masks = {"full_attention": seen | own}
    if "sliding_attention" in types:
        masks["sliding_attention"] = (seen & (k > q - window)) | own
    return {t: _as_mask(config, m, dtype) for t, m in masks.items() if t in types}


def _as_mask(config, allowed: torch.Tensor, dtype) -> torch.Tensor:
    """sdpa takes a boolean mask; eager attention adds 0 or the dtype's minimum to its scores."""
    if check_attention(config) == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
