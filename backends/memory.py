"""Will a model fit? The weights' size from the repo's files (or its config) against the memory
a backend may use, a quantized variant that fits when it does not, and the batch the rest holds.

Everything is estimated before anything is loaded or downloaded; the file and config probes are
arguments so tests can fake them.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pertoken.backends import machine as probe
from pertoken.backends.machine import gb
from pertoken.errors import PertokenError

PROMPT_TOKENS = 256  # a chat-templated question with its system instruction, generously
HEADROOM = 0.1  # share of the budget kept for activations, logits and the framework
MAX_BATCH = 16  # the non-CUDA default: memory only ever lowers it
VARIANT_BATCH = 4  # a variant is suggested only when it leaves room for this many slots
VARIANT_BITS = (8, 4)  # the mlx-community quantizations, largest first
DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}
_SUFFIX = re.compile(r"-(\d+bit|bf16|fp16|fp32|bfloat16|float16|float32)$", re.IGNORECASE)


@dataclass(frozen=True)
class Weights:
    bytes: int  # in memory, at the dtype they will be loaded in
    params: int | None  # parameter count, when the config or the files tell
    bits: float  # bits per weight as loaded (4-bit MLX: 4.5 with its scales and biases)
    source: str  # "files", "hub" or "config"


@dataclass(frozen=True)
class Fit:
    model: str
    weights: Weights | None  # None when neither files nor config could be read
    budget: int | None  # bytes the backend may use
    budget_source: str
    per_slot: int | None  # KV-cache bytes of one batch slot at full length

    @property
    def usable(self) -> int | None:
        return None if self.budget is None else int(self.budget * (1 - HEADROOM))

    @property
    def fits(self) -> bool | None:
        """None when the weights' size or the budget is unknown."""
        if self.weights is None or self.usable is None:
            return None
        return self.weights.bytes + (self.per_slot or 0) <= self.usable

    @property
    def batch_size(self) -> int | None:
        """Slots per batch whose KV cache fits in what the weights leave, at most MAX_BATCH."""
        if not self.fits or not self.per_slot:
            return None
        return max(1, min(MAX_BATCH, (self.usable - self.weights.bytes) // self.per_slot))

    def summary(self) -> str:
        if self.fits is None:
            why = "memory unknown" if self.weights else "size unknown (no files, hub or config)"
            return f"{self.model}: {why}, not checked"
        w = self.weights
        line = f"{self.model}: weights ~{gb(w.bytes)} ({w.source}) of ~{gb(self.budget)} "
        line += f"({self.budget_source})"
        batch = f", batches of {self.batch_size}" if self.batch_size else ""
        return line + (f": fits{batch}" if self.fits else ": does not fit")


def is_hub_id(model: str) -> bool:
    path = Path(model).expanduser()
    return not path.exists() and model.count("/") == 1 and not model.startswith((".", "/", "~"))


def repo_files(model: str) -> dict[str, int] | None:
    """{file name: bytes} of the weight files: a local folder's, or the hub's metadata."""
    path = Path(model).expanduser()
    if path.is_dir():
        return {p.name: p.stat().st_size for p in path.glob("*.safetensors")} or None
    return _hub_sizes(model) if is_hub_id(model) and not probe.hub_offline() else None


@functools.lru_cache(maxsize=16)
def _hub_sizes(repo: str) -> dict[str, int] | None:
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo, files_metadata=True, timeout=5)
    except Exception:  # unreachable, unknown or gated: fall back to the config
        return None
    sizes = {
        s.rfilename: s.size for s in info.siblings or [] if s.rfilename.endswith(".safetensors")
    }
    return sizes if sizes and all(sizes.values()) else None


def repo_config(model: str) -> dict | None:
    """config.json of a local folder, or of a hub repo (from the cache, else fetched)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return _read_json(path / "config.json")
    if not is_hub_id(model):
        return None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):
        return _read_json(Path(cached))
    if probe.hub_offline() or not probe.hub_reachable():  # else hf_hub_download retries ~20 s
        return None
    try:
        return _read_json(Path(hf_hub_download(model, "config.json", etag_timeout=5)))
    except Exception:  # unreachable, unknown or gated
        return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def count_params(config: dict) -> int | None:
    """Parameters of a Llama-style decoder (Llama, Mistral, Qwen 2, Gemma 2) from its config."""
    c = _text_config(config)
    try:
        hidden, layers = c["hidden_size"], c["num_hidden_layers"]
        inter, vocab, heads = c["intermediate_size"], c["vocab_size"], c["num_attention_heads"]
    except KeyError:
        return None
    kv = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim  # q, o; k, v
    tied = c.get("tie_word_embeddings", str(c.get("model_type", "")).startswith("gemma"))
    embeddings = vocab * hidden * (1 if tied else 2)
    return embeddings + layers * (attention + 3 * hidden * inter)  # gate, up, down


def quant_bits(config: dict | None) -> float | None:
    """Bits per weight of an MLX-quantized checkpoint, scales and biases included; else None."""
    q = (config or {}).get("quantization") or (config or {}).get("quantization_config") or {}
    if "bits" not in q:
        return None
    return q["bits"] + 32 / q.get("group_size", 64)  # a 16-bit scale and bias per group


def stored_bits(config: dict | None, disk: int, params: int | None) -> int:
    """16 or 32: from the files' size per parameter when known (configs often say float32 for
    bfloat16 files), else from the config's dtype."""
    if params:
        return 32 if disk * 8 / params > 24 else 16
    c = _text_config(config or {})
    return DTYPE_BITS.get(c.get("torch_dtype") or c.get("dtype"), 16)


def estimate_weights(
    model: str,
    *,
    dtype: str | None = None,
    files: Callable[[str], dict[str, int] | None] | None = None,
    config: Callable[[str], dict | None] | None = None,
) -> Weights | None:
    """The weights' bytes in memory at `dtype` (default: half precision; quantized stay so).
    `files` and `config` default to repo_files and repo_config."""
    cfg, sizes = (config or repo_config)(model), (files or repo_files)(model)
    params = count_params(cfg) if cfg else None
    quant = quant_bits(cfg)
    bits = quant or DTYPE_BITS.get(dtype or "bfloat16", 16)
    if sizes:
        disk = sum(sizes.values())
        source = "files" if Path(model).expanduser().is_dir() else "hub"
        if quant:
            return Weights(disk, params, bits, source)
        stored = stored_bits(cfg, disk, params)
        params = params or disk * 8 // stored
        return Weights(int(disk * bits / stored), params, bits, source)  # float32 loads as half
    if params:
        return Weights(int(params * bits / 8), params, bits, "config")
    return None


def kv_bytes_per_token(config: dict | None, dtype: str | None = None) -> int | None:
    """Keys and values of every layer for one token, at the activations' dtype."""
    c = _text_config(config or {})
    try:
        layers, heads = c["num_hidden_layers"], c["num_attention_heads"]
    except KeyError:
        return None
    kv = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return 2 * layers * kv * head_dim * DTYPE_BITS.get(dtype or "bfloat16", 16) // 8


def check_fit(
    model: str,
    *,
    dtype: str | None = None,
    max_new_tokens: int = 1000,
    budget: tuple[int | None, str] | None = None,
    files: Callable[[str], dict[str, int] | None] | None = None,
    config: Callable[[str], dict | None] | None = None,
) -> Fit:
    """How `model` fits in `budget` = (bytes, where from); default: what MLX may use here."""
    limit, where = budget or probe.mlx_budget()
    cfg = (config or repo_config)(model)  # read once: on the hub it may be a download
    weights = estimate_weights(model, dtype=dtype, files=files, config=lambda _: cfg)
    per_token = kv_bytes_per_token(cfg, dtype)
    per_slot = per_token * (PROMPT_TOKENS + max_new_tokens) if per_token else None
    return Fit(model, weights, limit, where, per_slot)


def require_fit(model: str, **options) -> Fit:
    """check_fit, raising a PertokenError that names a variant that fits when it does not."""
    fit = check_fit(model, **options)
    if fit.fits is False:
        raise PertokenError(too_big_message(fit))
    return fit


def too_big_message(fit: Fit) -> str:
    w = fit.weights
    head = (
        f"{fit.model} needs ~{gb(w.bytes)} for its weights and ~{gb(fit.per_slot)} per answer "
        f"in the KV cache, more than the ~{gb(fit.usable)} MLX may use here "
        f"({fit.budget_source}, less {HEADROOM:.0%} headroom)"
    )
    variant = smaller_variant(fit)
    if variant is None:
        return f"{head}: choose a smaller model (the README lists sizes per Mac)"
    name, size = variant
    return f"{head}: use --model {name} (~{gb(size)}) or a smaller model"


def smaller_variant(fit: Fit) -> tuple[str, int] | None:
    """(mlx-community repo, bytes) of the largest quantization of `fit.model` that fits with
    a batch of VARIANT_BATCH slots."""
    w = fit.weights
    if w is None or w.params is None or fit.usable is None:
        return None
    base = _SUFFIX.sub("", Path(fit.model.rstrip("/")).name)
    for bits in VARIANT_BITS:
        size = int(w.params * (bits + 0.5) / 8)  # 0.5: a 16-bit scale and bias per 64 weights
        if bits + 0.5 < w.bits and size + VARIANT_BATCH * (fit.per_slot or 0) <= fit.usable:
            return f"mlx-community/{base}-{bits}bit", size
    return None
