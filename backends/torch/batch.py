"""A planned batch (backends/plan.py) as torch tensors."""

from __future__ import annotations

import inspect

import torch

from pertoken.backends.plan import PaddedBatch


def batch_tensors(batch: PaddedBatch, device) -> tuple[torch.Tensor, ...]:
    """The plan's ids, attention mask and position ids, each [B, T] long on `device`."""
    arrays = (batch.ids, batch.mask, batch.positions)
    return tuple(torch.from_numpy(a).to(device, torch.long) for a in arrays)


def steer_tensor(batch: PaddedBatch, positions, device, start: int = 0, t=None) -> torch.Tensor:
    """The plan's steering mask [B, t] (see PaddedBatch.steer_mask) as a bool tensor."""
    return torch.from_numpy(batch.steer_mask(positions, start, t)).to(device)


def make_cache(model):
    """An empty growing KV cache for `model`."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` (newer transformers) or `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
