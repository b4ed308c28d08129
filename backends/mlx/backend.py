"""MLXBackend: the Backend protocol on pertoken's own MLX models (Apple Silicon; CPU for tests)."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from pertoken.backends import machine
from pertoken.backends.base import (
    Steer,
    Summaries,
    check_projection_inputs,
)
from pertoken.backends.chat import ChatText, stop_token_ids
from pertoken.backends.conditions import conditional_projections, decide_one
from pertoken.backends.generation import SlotBackend
from pertoken.backends.memory import HEADROOM, MAX_BATCH, kv_bytes_per_token
from pertoken.backends.mlx.batch import SteerPlan
from pertoken.backends.mlx.continuous import Slots
from pertoken.backends.mlx.load import (
    DTYPES,
    Loaded,
    generation_config,
    load,
    local_config,
    pick_device,
    pick_dtype,
)
from pertoken.backends.mlx.prefill import CHUNK, prefill
from pertoken.backends.mlx.summaries import summarize
from pertoken.backends.plan import (
    encode_pairs,
    encode_texts,
    left_pad,
    plan_batches,
)


class MLXBackend(ChatText, SlotBackend):
    name = "mlx"

    def __init__(self, loaded: Loaded):
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, loaded.config
        self.model_id = loaded.model_id
        self.n_layers = len(self.model.layers)
        self.hidden_size = int(self.config["hidden_size"])
        self.model_type = str(self.config.get("model_type") or "")  # llama, gemma2
        self.context_length = self.config.get("max_position_embeddings")
        self.dtype, self.device = loaded.dtype, loaded.device
        self.generation_config = generation_config(loaded.path)
        configs = [SimpleNamespace(**c) for c in (self.config, self.generation_config)]
        self.stop = set(stop_token_ids(self.tokenizer, *configs))
        pad = self.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)
        self.prefill_chunk = CHUNK  # input tokens per forward over a prompt or a text

    @classmethod
    def load(cls, model: str, *, dtype: str | None = None, device: str | None = None):
        """Load a Hugging Face folder or hub id, or an mlx-community quantized repo."""
        return cls(load(model, dtype=dtype, device=device))

    @classmethod
    def choose(cls, model: str, *, dtype: str | None = None, device: str | None = None):
        """(device, dtype) that `load` will pick; the checkpoint's half type is read from its
        config when it is on disk, else bfloat16 is assumed."""
        device = pick_device(device)
        return device, pick_dtype(dtype, local_config(model), device)

    # ------------------------------------------------------------------ generation
    def _slots(self, batch: int, rows: list[int], length: int, on_flush=None, prefix=None):
        """The slot loop (see backends/generation.py)."""
        return Slots(
            self.model, batch, rows=rows, stop=self.stop, hidden_size=self.hidden_size,
            dtype=self._mx_dtype, chunk=self.prefill_chunk, on_flush=on_flush, prefix=prefix,
        )  # fmt: skip

    # ------------------------------------------------------------------ forward-only
    def summaries(self, prompts: list[str], answers: list[str], *, batch_size: int = 8):
        """prompt_avg, prompt_last, response_avg per sample, each [N, n_layers + 1, hidden]."""
        seqs, prompt_lens = encode_pairs(self.encode, prompts, answers)
        out = np.zeros((len(seqs), self.n_layers + 1, 3, self.hidden_size), np.float32)
        for batch in plan_batches(
            seqs, self.pad_id, prompt_lens=prompt_lens, batch_size=batch_size
        ):
            out[batch.index] = summarize(self.model, batch, self.prefill_chunk)
        return Summaries.of(out)

    def logits(self, text: str, *, steer: Steer | None = None, prompt_len: int | None = None):
        """[T, vocab] float32 logits of one text (no special tokens added)."""
        (ids,) = encode_texts(self.encode, [text])
        plen = len(ids) if prompt_len is None else int(prompt_len)
        steer = decide_one(self, ids[:plen], steer)
        batch, plan = left_pad([ids], self.pad_id, prompt_lens=[plen]), self._plan(steer)
        kw = {}
        if plan is not None:
            kw = {"steer": plan.vectors, "steer_on": plan.prefill_on(batch)}
        out = prefill(self.model, batch, chunk=self.prefill_chunk, head="all", **kw)
        return np.array(out[0].astype(mx.float32))

    def next_token_logprobs(self, prompts: list[str], *, batch_size: int = 8) -> np.ndarray:
        """[N, vocab] float32 log-probabilities of the token after each prompt."""
        seqs = encode_texts(self.encode, prompts)
        out: np.ndarray | None = None
        for batch in plan_batches(seqs, self.pad_id, batch_size=batch_size):
            last = prefill(self.model, batch, chunk=self.prefill_chunk, head="last")
            logits = last[:, -1].astype(mx.float32)  # [B, vocab]
            lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            out = np.zeros((len(seqs), lp.shape[1]), np.float32) if out is None else out
            out[batch.index] = lp
        return out

    # ------------------------------------------------------------------ per-token traces
    def token_projections(
        self, ids, directions, rows, *, steer=None, prompt_lens=None, batch_size=16
    ):
        """Per sequence float32 [T, len(rows), V + 1]: h . u per unit direction, then |h|."""
        from pertoken.backends.mlx.trace_batch import token_projections

        if steer is not None and steer.conditional:
            return conditional_projections(
                self.token_projections, ids, directions, rows, steer, prompt_lens, batch_size
            )
        d = check_projection_inputs(ids, directions, rows, self.n_layers, self.hidden_size)
        batches = plan_batches(ids, self.pad_id, prompt_lens=prompt_lens, batch_size=batch_size)
        return token_projections(
            self.model, d, [int(r) for r in rows], batches, plan=self._plan(steer),
            chunk=self.prefill_chunk,
        )  # fmt: skip

    # ------------------------------------------------------------------ helpers
    def _plan(self, steer: Steer | None) -> SteerPlan | None:
        if steer is None:
            return None
        steer.validate(self.n_layers, self.hidden_size, self.dtype)
        return SteerPlan.of(steer, self._mx_dtype)

    @property
    def _mx_dtype(self):
        return DTYPES[self.dtype]

    def _auto_batch(self, max_len: int) -> int:
        """Slots whose KV cache fits in what Metal may still use (its recommended working set
        less what MLX holds, the weights first), at most MAX_BATCH; 8 without Metal."""
        if not mx.metal.is_available():
            return 8
        budget, _ = machine.mlx_budget()
        per_token = kv_bytes_per_token(self.config, self.dtype)
        if not budget or not per_token:
            return 8
        free = budget * (1 - HEADROOM) - mx.get_active_memory()
        return int(max(1, min(MAX_BATCH, free // (per_token * max_len))))
