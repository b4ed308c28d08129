"""Padding, position masks and the KV-cached decode loop for transformers models."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pertoken.backends.base import Sampling
from pertoken.backends.torch.hooks import TapState
from pertoken.backends.torch.sampling import Sampler
from pertoken.backends.torch.stream import RowStream


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] left-padded token ids
    attn: torch.Tensor  # [B, T] 1 for real tokens
    pad: torch.Tensor  # [B] left padding of each row
    prompt_len: torch.Tensor  # [B] unpadded prompt length of each row


def left_pad(seqs: list[list[int]], pad_id: int, device, prompt_lens=None) -> Batch:
    """Left-pad token lists; prompt_lens defaults to each sequence's full length."""
    width = max(len(s) for s in seqs)
    pad = [width - len(s) for s in seqs]
    ids = torch.tensor([[pad_id] * p + s for p, s in zip(pad, seqs)], device=device)
    attn = torch.tensor([[0] * p + [1] * len(s) for p, s in zip(pad, seqs)], device=device)
    lens = prompt_lens if prompt_lens is not None else [len(s) for s in seqs]
    return Batch(ids, attn, torch.tensor(pad, device=device), torch.tensor(lens, device=device))


def position_mask(batch: Batch, start: int, t: int, positions: str | list[str]) -> torch.Tensor:
    """[B, t] bool: which of the padded positions start..start+t-1 a Steer acts on.

    positions: one choice for every row, or one per row."""
    if not isinstance(positions, str):
        masks = {p: position_mask(batch, start, t, p) for p in set(positions)}
        return torch.stack([masks[p][b] for b, p in enumerate(positions)])
    idx = torch.arange(start, start + t, device=batch.pad.device)[None] - batch.pad[:, None]
    valid = idx >= 0
    if positions == "prompt":
        return valid & (idx < batch.prompt_len[:, None])
    if positions == "response":
        return valid & (idx >= batch.prompt_len[:, None] - 1)
    return valid


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
    batch: Batch,
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
    attn = batch.attn
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, T0] positions ignore left padding
    state.steer_mask = position_mask(batch, 0, T0, opts.positions) if state.steer else None
    logits = forward_last(model, batch.ids, attn, pos, cache)
    sample = Sampler(opts.sampling, opts.stop_ids, gen)
    sample.start(batch.ids, attn, logits.shape[-1])
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
            state.steer_mask = position_mask(batch, T0 + step, 1, opts.positions)
        if on_token is not None:
            on_token(tok.tolist())
        logits = forward_last(model, tok[:, None], attn, next_pos, cache)
        next_pos = next_pos + 1
    ids = torch.stack(toks, 1).tolist()  # [B, steps]
    mask = torch.stack(keep, 1).tolist()
    return [[t for t, k in zip(r, m) if k] for r, m in zip(ids, mask)]
