"""The PyTorch backend: transformers models with residual-stream hooks, on CUDA or CPU."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from pertoken.backends.base import (
    Steer,
    Summaries,
)
from pertoken.backends.chat import ChatText, stop_token_ids
from pertoken.backends.conditions import conditional_projections, decide_one
from pertoken.backends.generation import SlotBackend
from pertoken.backends.gguf import model_id as gguf_model_id
from pertoken.backends.plan import (
    PaddedBatch,
    encode_pairs,
    encode_texts,
    left_pad,
    plan_batches,
)
from pertoken.backends.torch.batch import batch_tensors, steer_tensor
from pertoken.backends.torch.compiled import CompiledSteps, Shape, eager_steps
from pertoken.backends.torch.continuous import Slots
from pertoken.backends.torch.hooks import (
    TapState,
    block_devices,
    decoder_parts,
    input_device,
    residual_taps,
)
from pertoken.backends.torch.load import load_model_and_tokenizer, pick_device, pick_dtype
from pertoken.backends.torch.static_cache import ATTENTION
from pertoken.backends.torch.steering import steer_state
from pertoken.errors import PertokenError


class TorchBackend(ChatText, SlotBackend):
    name = "torch"

    def __init__(
        self, model, tokenizer, *, model_id: str, dtype: str, device: str, compile: bool = False
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.dtype = dtype
        self.device = device
        layers, _ = decoder_parts(model)
        self.n_layers = len(layers)
        self.hidden_size = int(model.config.hidden_size)
        self.model_type = str(getattr(model.config, "model_type", "") or "")  # llama, gemma2
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id
        gen_config = getattr(model, "generation_config", None)
        stops = stop_token_ids(tokenizer, model.config, gen_config)
        self.stop_ids = torch.tensor(stops, device=device)
        self.generation_config = _set_fields(gen_config)
        # the slot loop's step kept and captured as a CUDA graph (None: a plain step per loop)
        self.compiled = CompiledSteps(model) if compile else None

    @classmethod
    def load(
        cls,
        model: str,
        *,
        dtype: str | None = None,
        device: str | None = None,
        compile: bool = False,
    ):
        """Load a hub id or local folder; device auto = cuda (sharded over several CUDA devices)
        else cpu, dtype auto = bf16 on cuda. compile: decode through the static step, captured
        as a CUDA graph on CUDA (`compiled.warmup_seconds` reports the capture time)."""
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        lm, tok = load_model_and_tokenizer(model, dtype, device)
        model_id = gguf_model_id(model) or (
            Path(model).name if Path(model).expanduser().is_dir() else model
        )
        device = str(input_device(lm)) if device == "auto" else device
        return cls(lm, tok, model_id=model_id, dtype=dtype, device=device, compile=compile)

    @classmethod
    def choose(cls, model: str, *, dtype: str | None = None, device: str | None = None):
        """(device, dtype) that `load` will pick."""
        device = pick_device(device)
        return device, pick_dtype(dtype, device)

    # ------------------------------------------------------------------ steering
    def _tap_state(self, steer: Steer | None) -> TapState:
        if steer is None:
            return TapState()
        steer.validate(self.n_layers, self.hidden_size, self.dtype)
        return TapState(steer=steer_state(self.model, [steer]))

    # ------------------------------------------------------------------ generation
    def _slots(self, batch: int, rows: list[int], length: int, on_flush=None, prefix=None):
        """The slot loop (see backends/generation.py), its hooks installed while it lives."""
        impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        if impl not in ATTENTION:
            raise PertokenError(
                f"generation needs sdpa or eager attention, not {impl!r}: load the model with "
                "attn_implementation='sdpa'"
            )
        return _TapSlots(self, Shape(batch, length, tuple(sorted(set(rows)))), on_flush, prefix)

    def _auto_batch(self, max_len: int) -> int:
        """Slots whose KV cache fits in 70% of free GPU memory (8 on the CPU), at most 128; a
        sharded model's cache is split like its blocks, so the fullest device decides."""
        if not self.device.startswith("cuda"):
            return 8
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        per_block = 2 * kv_heads * head_dim * max_len * self.model.dtype.itemsize  # one slot
        blocks = Counter(block_devices(self.model))
        free = {d: torch.cuda.mem_get_info(d)[0] for d in blocks}
        slots = min(0.7 * free[d] // (n * per_block) for d, n in blocks.items())
        return int(max(1, min(128, slots)))

    # ------------------------------------------------------------------ teacher-forced passes
    @torch.inference_mode()
    def summaries(self, prompts: list[str], answers: list[str], *, batch_size: int = 8):
        """prompt_avg, prompt_last, response_avg per sample, each [N, n_layers+1, hidden]."""
        seqs, prompt_lens = encode_pairs(self.encode, prompts, answers)
        out = np.zeros((len(seqs), self.n_layers + 1, 3, self.hidden_size), np.float32)
        for batch in plan_batches(
            seqs, self.pad_id, prompt_lens=prompt_lens, batch_size=batch_size
        ):
            out[batch.index] = self._means(batch)
        return Summaries.of(out)

    def _means(self, batch: PaddedBatch) -> np.ndarray:
        """[B, n_layers + 1, 3, hidden]: `w @ h` at every row inside one forward."""
        ids, attn, pos = batch_tensors(batch, self.device)
        w = torch.from_numpy(batch.summary_weights()).to(self.device)  # [B, 3, T]
        means: dict[int, torch.Tensor] = {}  # row -> [B, 3, hidden]
        state = TapState(rows=frozenset(range(self.n_layers + 1)))
        state.on_row = lambda row, h: means.__setitem__(row, w @ h.float())
        with residual_taps(self.model, state):
            self.model.get_decoder()(
                input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False
            )
        return torch.stack([means[r] for r in sorted(means)], 1).cpu().numpy()

    @torch.inference_mode()
    def logits(self, text: str, *, steer: Steer | None = None, prompt_len: int | None = None):
        """[T, vocab] float32 logits of one text; prompt_len places `prompt`/`response` steering."""
        (seq,) = encode_texts(self.encode, [text])
        batch = left_pad([seq], self.pad_id, prompt_lens=[prompt_len or len(seq)])
        steer = decide_one(self, seq[: prompt_len or len(seq)], steer)
        state = self._tap_state(steer)
        if steer is not None:
            state.steer_mask = steer_tensor(batch, steer.positions, self.device)
        ids, attn, _ = batch_tensors(batch, self.device)
        with residual_taps(self.model, state):
            out = self.model(input_ids=ids, attention_mask=attn, use_cache=False)
        return out.logits[0].float().cpu().numpy()

    @torch.inference_mode()
    def next_token_logprobs(self, prompts: list[str], *, batch_size: int = 8) -> np.ndarray:
        """[N, vocab] float32 log-probabilities of the next token after each prompt."""
        seqs = encode_texts(self.encode, prompts)
        out: np.ndarray | None = None
        for batch in plan_batches(seqs, self.pad_id, batch_size=batch_size):
            ids, attn, pos = batch_tensors(batch, self.device)
            last = self.model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=pos,
                use_cache=False,
                logits_to_keep=1,
            ).logits[:, -1]  # [B, vocab]
            out = np.zeros((len(seqs), last.shape[-1]), np.float32) if out is None else out
            out[batch.index] = torch.log_softmax(last.float(), -1).cpu().numpy()
        return out

    # ------------------------------------------------------------------ per-token traces
    def token_projections(
        self, ids, directions, rows, *, steer=None, prompt_lens=None, batch_size=16
    ):
        """Per sequence float32 [T, len(rows), V + 1]: h . u per unit direction, then |h|."""
        from pertoken.backends.torch.trace_batch import token_projections

        if steer is not None and steer.conditional:
            return conditional_projections(
                self.token_projections, ids, directions, rows, steer, prompt_lens, batch_size
            )
        return token_projections(
            self, ids, directions, rows, steer=steer, prompt_lens=prompt_lens, batch_size=batch_size
        )


def _set_fields(gen_config) -> dict:
    """The fields a checkpoint's generation config sets (transformers leaves the rest None)."""
    if gen_config is None:
        return {}
    return {k: v for k, v in gen_config.to_dict().items() if v is not None}


class _TapSlots:
    """The torch Slots with the residual hooks installed for each step (and for building the
    step, which a CUDA graph captures with them) and removed after it, so other forwards of
    the same model between steps run without them. A plain step that neither steers nor
    captures runs without them."""

    def __init__(self, backend: TorchBackend, shape: Shape, on_flush, prefix):
        b, self.state, self.model = backend, TapState(), backend.model
        self.compiled = b.compiled is not None
        steps = b.compiled or eager_steps(b.model)
        with torch.inference_mode(), residual_taps(self.model, self.state):
            self.slots = Slots(b.model, shape, self.state, b.stop_ids, b.pad_id, steps, on_flush,
                               prefix)  # fmt: skip

    def insert(self, entry) -> None:
        self.slots.insert(entry)

    @property
    def busy(self) -> bool:
        return self.slots.busy

    def step(self) -> None:
        tapped = self.compiled or self.slots.tapped
        with (
            torch.inference_mode(),
            residual_taps(self.model, self.state) if tapped else nullcontext(),
        ):
            self.slots.step()
