"""Per-token reports from the batched decode loop: tokens, logprobs and captured rows.

With capture rows, a token's hidden state exists only once the token is fed back, so its report
waits for that forward (the loop runs one extra forward at the end, as `trace` does)."""

from __future__ import annotations

import numpy as np
import torch

from pertoken.backends.base import Streaming, TokenStep


class RowStream:
    """Turns one batch's sampled tokens into TokenStep reports for the prompts it holds."""

    def __init__(self, spec: Streaming, prompt_index: list[int]):
        self.spec, self.index = spec, list(prompt_index)  # batch row -> prompt index
        self.rows = list(spec.rows)
        self.count = [0] * len(self.index)  # tokens reported per batch row
        self.stop = [False] * len(self.index)
        self.pending: tuple | None = None  # the step whose hidden states are in flight
        self.got: dict[int, torch.Tensor] = {}

    def sampled(self, tok: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor) -> None:
        """tok [B] ids, logits [B, vocab] float32 that chose them, keep [B] answer tokens."""
        step = (tok.tolist(), keep.tolist(), self._logprobs(logits, tok))
        if self.rows:
            self.pending = step
        else:
            self._report(*step, None)

    def on_row(self, row: int, h: torch.Tensor) -> None:
        """Capture hook: h [B, t, hidden]; the prefill forward (nothing pending) is ignored."""
        if self.pending is None or row not in self.rows:
            return
        self.got[row] = h[:, -1].float()
        if len(self.got) == len(set(self.rows)):
            hidden = torch.stack([self.got[r] for r in self.rows], 1).cpu().numpy()  # [B, R, H]
            step, self.pending, self.got = self.pending, None, {}
            self._report(*step, hidden)

    def ended(self, done: torch.Tensor) -> torch.Tensor:
        """done [B] with the rows whose callback asked to stop added."""
        if not any(self.stop):
            return done
        return done | torch.tensor(self.stop, device=done.device)

    def _logprobs(self, logits: torch.Tensor, tok: torch.Tensor):
        k = self.spec.logprobs
        if k is None:
            return None
        lp = torch.log_softmax(logits, -1)  # [B, vocab]
        chosen = lp.gather(-1, tok[:, None])[:, 0].tolist()
        if k == 0:
            return chosen, None
        top = lp.topk(min(k, lp.shape[-1]), dim=-1)  # sorted, best first
        return chosen, (top.indices.tolist(), top.values.tolist())

    def _report(self, ids, keep, lps, hidden: np.ndarray | None) -> None:
        for b, kept in enumerate(keep):
            if not kept or self.stop[b]:
                continue
            step = TokenStep(self.index[b], self.count[b], int(ids[b]))
            if hidden is not None:
                step.hidden = hidden[b]
            if lps is not None:
                step.logprob = float(lps[0][b])
                if lps[1] is not None:
                    step.top = list(zip(lps[1][0][b], lps[1][1][b]))
            self.count[b] += 1
            if self.spec.on_step(step) is False:
                self.stop[b] = True
        if self.spec.on_flush is not None:
            self.spec.on_flush()
