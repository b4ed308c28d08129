"""One choice of one request as its tokens arrive: text, stop strings, logprobs, projections.

Text grows by decoding a short window of ids (prefix offsets, as streaming detokenizers do), so
each token costs a small decode however long the answer. With stop strings, text that could be
the start of one is held back until it cannot be."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pertoken.backends.base import TokenStep
from pertoken.pipeline.projection import project_rows
from pertoken.serve.protocol import logprob_entry


@dataclass
class Delta:
    """What one choice gained from one token (or its end)."""

    choice: int
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    projections: list | None = None  # [token][vector][row]
    logprobs: list[dict] | None = None
    finish: str | None = None


class Detokenizer:
    """Text pieces of a growing list of ids."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids = decode, []
        self.prefix, self.read = 0, 0  # ids[prefix:read] decode to the text already returned

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the bytes that finish it
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]

    def flush(self) -> str:
        """What is left when the answer ends, an unfinished character included."""
        before = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]


class Choice:
    """Turns one choice's TokenSteps into Deltas and says when the choice is finished."""

    def __init__(
        self,
        index: int,
        *,
        decode: Callable[[list[int]], str],
        token_text: Callable[[int], str],
        max_tokens: int,
        stop: list[str],
        directions: np.ndarray | None = None,  # [K, R, hidden] when monitoring
        logprobs: int | None = None,
    ):
        self.index, self.max_tokens, self.stops = index, max_tokens, stop
        self.detok, self.token_text = Detokenizer(decode), token_text
        self.directions, self.logprobs = directions, logprobs
        self.text, self.sent = "", 0  # text so far; how much of it was handed out
        self.count, self.finish = 0, None

    def add(self, step: TokenStep) -> Delta:
        piece = self.detok.add(step.token_id)
        self.count += 1
        self.text += piece
        delta = Delta(self.index, tokens=[piece])
        if self.directions is not None:
            proj, _ = project_rows(step.hidden[None], self.directions)  # [1, K, R]
            delta.projections = np.where(np.isfinite(proj), proj, None).tolist()  # NaN: null
        if self.logprobs is not None:
            top = [(self.token_text(i), lp) for i, lp in (step.top or [])[: self.logprobs]]
            delta.logprobs = [logprob_entry(self.token_text(step.token_id), step.logprob, top)]
        cut = self._stop_at()
        if cut is not None:
            self.text, self.finish = self.text[:cut], "stop"
        elif self.count >= self.max_tokens:
            self._finish("length")
        delta.text, delta.finish = self._release(), self.finish
        return delta

    def end(self) -> Delta:
        """The answer ended on the model's own stop token (or the batch's last step)."""
        if self.finish is None:
            self._finish("stop")
        return Delta(self.index, text=self._release(), finish=self.finish)

    def _finish(self, reason: str) -> None:
        self.text += self.detok.flush()
        cut = self._stop_at()
        self.text = self.text if cut is None else self.text[:cut]
        self.finish = "stop" if cut is not None else reason

    def _stop_at(self) -> int | None:
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, self.sent - len(s)))) >= 0]
        return min(hits) if hits else None

    def _release(self) -> str:
        end = len(self.text) if self.finish else len(self.text) - self._held()
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def _held(self) -> int:
        """Length of the longest tail of the text that starts a stop string."""
        for n in range(min(len(self.text), max(map(len, self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stops):
                return n
        return 0
