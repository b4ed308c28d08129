"""The KV-cached decode loop for transformers models, over a batch planned in backends/plan.py."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pertoken.backends.base import Sampling
from pertoken.backends.plan import PaddedBatch
from pertoken.backends.torch.hooks import TapState, input_device
from pertoken.backends.torch.sampling import Sampler
from pertoken.backends.torch.stream import RowStream


def batch_tensors(batch: PaddedBatch, device) -> tuple[torch.Tensor, ...]:
    """The plan's ids, attention mask and position ids, each [B, T] long on `device`."""
    arrays = (batch.ids, batch.mask, batch.positions)
    return tuple(torch.from_numpy(a).to(device, torch.long) for a in arrays)


def steer_tensor(batch: PaddedBatch, positions, device, start: int = 0, t=None) -> torch.Tensor:
    """The plan's steering mask [B, t] (see PaddedBatch.steer_mask) as a bool tensor."""
    return torch.from_numpy(batch.steer_mask(positions, start, t)).to(device)


def make_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_last(model, ids, attn, pos, cache) -> torch.Tensor:
    """One cached forward; returns the last position's logits [B, vocab] in float32."""
    kw = {_cache_kwarg(model): cache}
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1, **kw
    )
    return out.logits[:, -1].float()


@dataclass
class DecodeOptions:
    max_new_tokens: int
    sampling: Sampling
    stop_ids: torch.Tensor  # [S]
    pad_id: int
    positions: str | list[str] = "all"  # one choice for the batch, or one per row
    feed_last: bool = False  # run the final token through the model too (to capture it)
    uniforms: torch.Tensor | None = None  # [B, max_new_tokens]: per-row draws in [0, 1)


def decode(
    model,
    batch: PaddedBatch,
    state: TapState,
    opts: DecodeOptions,
    gen=None,
    on_token: Callable[[list[int]], None] | None = None,
    check_every: int = 16,
    stream: RowStream | None = None,
) -> list[list[int]]:
    """Generate per row until a stop id or max_new_tokens; returns answer ids without stops.

    Tokens stay on the device and the host looks at them only every `check_every` steps (every
    step when tracing or streaming), so a GPU is not stalled by a sync per token. on_token(tokens)
    is called before each decode forward with the ids being fed, so hooks can attribute captured
    states. `stream` hears of every sampled token and may end rows."""
    B, T0 = batch.ids.shape
    cache = make_cache(model)
    ids, attn, pos = batch_tensors(batch, input_device(model))  # [B, T0] each
    # where steering acts at every position the loop can reach: [B, T0 + max_new_tokens]
    on = steer_tensor(batch, opts.positions, ids.device, 0, T0 + opts.max_new_tokens)
    state.steer_mask = on[:, :T0]
    logits = forward_last(model, ids, attn, pos, cache)
    sample = Sampler(opts.sampling, opts.stop_ids, gen)
    sample.start(ids, attn, logits.shape[-1])
    next_pos = pos[:, -1:] + 1  # [B, 1]
    done = torch.zeros(B, dtype=torch.bool, device=attn.device)
    toks, keep = [], []  # per step: [B] ids, [B] whether the id belongs to the answer
    every_step = on_token is not None or stream is not None
    for step in range(opts.max_new_tokens):
        if stream is not None:
            done = stream.ended(done)
        u = None if opts.uniforms is None else opts.uniforms[:, step]
        tok = sample(logits, first=step == 0, u=u)
        tok = torch.where(done, torch.full_like(tok, opts.pad_id), tok)
        stopped = torch.isin(tok, opts.stop_ids)
        toks.append(tok)
        keep.append(~(done | stopped))
        done |= stopped
        if stream is not None:
            stream.sampled(tok, logits, keep[-1])
            done = stream.ended(done)
        if step == opts.max_new_tokens - 1 and not opts.feed_last:
            break
        if (every_step or (step + 1) % check_every == 0) and bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        if state.steer:
            state.steer_mask = on[:, T0 + step : T0 + step + 1]
        if on_token is not None:
            on_token(tok.tolist())
        logits = forward_last(model, tok[:, None], attn, next_pos, cache)
        next_pos = next_pos + 1
    ids = torch.stack(toks, 1).tolist()  # [B, steps]
    mask = torch.stack(keep, 1).tolist()
    return [[t for t, k in zip(r, m) if k] for r, m in zip(ids, mask)]
