"""The batch plan both backends run, in numpy: checked token ids, length-sorted left-padded
batches, where steering acts, the per-sample summary weights and each token's text piece.

A backend only converts a PaddedBatch to its tensors, runs the model and reduces with `w @ h`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pertoken.errors import PertokenError
from pertoken.names import POSITIONS

SUMMARY_KINDS = ("prompt_avg", "prompt_last", "response_avg")  # the weights' middle axis
_INCOMPLETE = "\ufffd"  # what a tokenizer decodes part of a multi-byte character to


# ---------------------------------------------------------------------- encoding
def encode_texts(
    encode: Callable[[str], list[int]],
    texts: Sequence[str],
    *,
    limit: int | None = None,
    what: str = "prompt",
) -> list[list[int]]:
    """Token ids of each text; no texts, an empty one or one over `limit` tokens is an error."""
    if not texts:
        raise PertokenError("no prompts given: pass at least one prompt")
    seqs = [list(encode(t)) for t in texts]
    if any(not s for s in seqs):
        raise PertokenError("a prompt is empty after tokenization: every prompt needs text")
    long = [i for i, s in enumerate(seqs) if limit is not None and len(s) > limit]
    if long:
        i = long[0]
        others = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
        raise PertokenError(
            f"{what} {i + 1}{others} is {len(seqs[i])} tokens long but the model reads at most "
            f"{limit}: shorten it"
        )
    return seqs


def encode_pairs(
    encode: Callable[[str], list[int]],
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    limit: int | None = None,
) -> tuple[list[list[int]], np.ndarray]:
    """(ids of each prompt + answer, [N] prompt lengths) for teacher-forced summaries."""
    if len(prompts) != len(answers):
        raise PertokenError(f"{len(prompts)} prompts but {len(answers)} answers")
    prompt_lens = np.array([len(s) for s in encode_texts(encode, prompts)], dtype=np.int64)
    full = [p + a for p, a in zip(prompts, answers)]
    return encode_texts(encode, full, limit=limit, what="prompt with its answer"), prompt_lens


# ---------------------------------------------------------------------- batching
def length_chunks(
    lengths: Sequence[int], *, batch_size: int | None = None, token_budget: int | None = None
) -> list[np.ndarray]:
    """Indices sorted by length (stable), cut into batches of at most `batch_size` slots whose
    padded size (slots x longest) stays within `token_budget`; a slot over the budget goes alone."""
    for name, value in (("batch size", batch_size), ("token budget", token_budget)):
        if value is not None and value < 1:
            raise PertokenError(f"{name} must be at least 1, not {value}")
    chunks: list[list[int]] = [[]]
    for i in np.argsort(np.asarray(lengths), kind="stable"):
        slots, width = len(chunks[-1]), int(lengths[i])  # ascending: sequence i is the longest yet
        full = batch_size is not None and slots >= batch_size
        over = token_budget is not None and (slots + 1) * width > token_budget
        if slots and (full or over):
            chunks.append([])
        chunks[-1].append(int(i))
    return [np.array(c, dtype=np.int64) for c in chunks if c]


@dataclass
class PaddedBatch:
    """Sequences padded on the left so they end together; `index` maps slots back to the input."""

    index: np.ndarray  # [B] int64 position of each slot in the caller's list
    ids: np.ndarray  # [B, T] int32 token ids
    mask: np.ndarray  # [B, T] bool: real tokens (the attention mask)
    prompt_lens: np.ndarray  # [B] int64: how many leading real tokens of each slot are prompt

    @property
    def lens(self) -> np.ndarray:
        return self.mask.sum(axis=1)  # [B] real tokens per slot

    @property
    def pad(self) -> np.ndarray:
        return self.ids.shape[1] - self.lens  # [B] left padding per slot

    @property
    def positions(self) -> np.ndarray:
        """[B, T] int64 position ids counted from each slot's first real token (0 on padding)."""
        return np.maximum(self._token_index(0, self.ids.shape[1]), 0)

    def _token_index(self, start: int, t: int) -> np.ndarray:
        # [B, t] index of padded positions start..start+t-1 within each slot; < 0 on padding
        return np.arange(start, start + t)[None] - self.pad[:, None]

    def steer_mask(
        self, positions: str | Sequence[str], start: int = 0, t: int | None = None
    ) -> np.ndarray:
        """[B, t] bool: where a Steer acts among padded positions start..start+t-1 (positions
        past T are generated tokens), one choice for every slot or one per slot; never on
        padding."""
        t = self.ids.shape[1] - start if t is None else t
        idx, P = self._token_index(start, t), self.prompt_lens[:, None]  # [B, t], [B, 1]
        if isinstance(positions, str):
            return _steer_rule(idx, P, positions)
        return np.stack([_steer_rule(idx[b], P[b], p) for b, p in enumerate(positions)])

    def unpadded(self, out: np.ndarray) -> list[np.ndarray]:
        """Each slot's real positions of a per-position result [B, T, ...] (padding dropped)."""
        return [out[b, p:] for b, p in enumerate(self.pad)]

    def summary_weights(self) -> np.ndarray:
        """[B, 3, T] float32 weights for SUMMARY_KINDS: each sums to 1 over its tokens, or is
        NaN throughout when its part is empty (an empty answer), so `w @ h` gives the means."""
        idx = self._token_index(0, self.ids.shape[1])  # [B, T]; < 0 on padding
        # a prompt that tokenizes longer alone than inside prompt + answer ends at the last token
        P = np.minimum(self.prompt_lens, self.lens)[:, None]  # [B, 1]
        parts = np.stack([(idx >= 0) & (idx < P), (idx >= 0) & (idx == P - 1), idx >= P], 1)
        with np.errstate(invalid="ignore"):
            return (parts / parts.sum(axis=2, keepdims=True)).astype(np.float32)


def left_pad(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    prompt_lens: Sequence[int] | None = None,
    index: Sequence[int] | None = None,
) -> PaddedBatch:
    """Pad token lists on the left; prompt_lens default to the whole sequence."""
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    T = int(lens.max())
    ids = np.full((len(seqs), T), pad_id, dtype=np.int32)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = s
    mask = np.arange(T)[None] >= (T - lens)[:, None]
    prompt = lens if prompt_lens is None else np.asarray(prompt_lens, dtype=np.int64)
    source = np.arange(len(seqs)) if index is None else np.asarray(index, dtype=np.int64)
    return PaddedBatch(source, ids, mask, prompt)


def plan_batches(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    prompt_lens: Sequence[int] | None = None,
    batch_size: int | None = None,
    token_budget: int | None = None,
) -> list[PaddedBatch]:
    """Length-sorted left-padded batches covering every sequence once (see length_chunks)."""
    lens = [len(s) for s in seqs]
    prompt = lens if prompt_lens is None else list(prompt_lens)
    return [
        left_pad([seqs[i] for i in idx], pad_id, prompt_lens=[prompt[i] for i in idx], index=idx)
        for idx in length_chunks(lens, batch_size=batch_size, token_budget=token_budget)
    ]


# ---------------------------------------------------------------------- steering positions
def _steer_rule(idx: np.ndarray, prompt_len, positions: str) -> np.ndarray:
    # idx: index of each position within its own sequence (< 0 on padding)
    valid = idx >= 0
    if positions == "all":
        return valid
    if positions == "prompt":
        return valid & (idx < prompt_len)
    if positions == "response":  # the last prompt token predicts the first answer token
        return valid & (idx >= prompt_len - 1)
    raise PertokenError(f"positions must be one of {POSITIONS}, not {positions!r}")


def steer_mask(prompt_len: int, total_len: int, positions: str) -> np.ndarray:
    """[total_len] bool: which positions of one unpadded sequence a Steer acts on."""
    return _steer_rule(np.arange(total_len), prompt_len, positions)


# ---------------------------------------------------------------------- token pieces
class TokenPieces:
    """Each token's share of the decoded text, one token at a time (as it is generated).

    A piece is the text the token adds. Part of a multi-byte character (decoded as U+FFFD)
    is held back until the token that completes it, so the pieces join to the text; when
    decoding rewrites text already given out (tokenizer clean-up), the piece is the token
    decoded alone."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.pieces: list[str] = []
        self.given = ""  # the text handed out so far

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.decode(self.ids).rstrip(_INCOMPLETE)
        if text.startswith(self.given):
            piece = text[len(self.given) :]
        else:
            piece = self.decode([int(token)])
        self.given = text
        self.pieces.append(piece)
        return piece

    def rest(self) -> str:
        """Text not handed out yet: an answer that ends inside a multi-byte character."""
        text = self.decode(self.ids)
        return text[len(self.given) :] if text.startswith(self.given) else ""


def token_pieces(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """The piece of every token of a finished answer (the last one takes any held-back rest)."""
    pieces = TokenPieces(decode)
    for token in ids:
        pieces.add(token)
    out = pieces.pieces
    if out:
        out[-1] += pieces.rest()
    return out
