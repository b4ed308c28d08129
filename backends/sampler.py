"""The sampler of every generating stage: `plain` (a temperature, the pipeline's defaults) or
`model` (the checkpoint's generation_config, as transformers' `generate` applies it by default),
for replicating runs made with plain `model.generate(...)`."""

from __future__ import annotations

from pertoken.errors import PertokenError
from pertoken.names import SAMPLERS as SAMPLERS

# transformers' values for what a generation_config leaves unset
HF_DEFAULTS = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
}


def sampling_options(
    backend, sampler: str = "plain", temperature: float | None = None, *, default: float = 1.0
) -> dict:
    """Keyword options for `backend.generate`.

    plain: the temperature (`default` when None), nothing else. model: the checkpoint's
    top_k, top_p and repetition_penalty, and its temperature when `temperature` is None
    (greedy unless the config sets do_sample, as transformers does)."""
    if sampler == "plain":
        return {"temperature": default if temperature is None else float(temperature)}
    if sampler != "model":
        raise PertokenError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    given = getattr(backend, "generation_config", None) or {}
    cfg = HF_DEFAULTS | {k: v for k, v in given.items() if k in HF_DEFAULTS and v is not None}
    if temperature is None:
        temperature = cfg["temperature"] if cfg["do_sample"] else 0.0
    return {
        "temperature": float(temperature),
        "top_k": int(cfg["top_k"]),
        "top_p": float(cfg["top_p"]),
        "repetition_penalty": float(cfg["repetition_penalty"]),
    }
