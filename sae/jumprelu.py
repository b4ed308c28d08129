"""JumpReLU SAEs (Gemma Scope): a feature fires only when its pre-activation exceeds its own
threshold, and then passes the pre-activation through unchanged (no shift by the threshold)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pertoken.errors import PertokenError
from pertoken.sae.base import SAE, SAEInfo


@dataclass(eq=False)
class JumpReLUSAE(SAE):
    threshold: np.ndarray | None = None  # [d_sae]

    architecture = "jumprelu"

    def __post_init__(self):
        super().__post_init__()
        if self.threshold is None or self.threshold.shape != (self.d_sae,):
            got = None if self.threshold is None else list(self.threshold.shape)
            raise PertokenError(
                f"JumpReLU SAE {self.info.spec} needs a threshold of shape [{self.d_sae}], "
                f"got {got}: the SAE file lacks its `threshold` array"
            )

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], cfg: dict, info: SAEInfo) -> SAE:
        threshold = arrays.get("threshold")
        if threshold is None and "log_threshold" in arrays:
            threshold = np.exp(arrays["log_threshold"]).astype(np.float32)
        return cls(
            **{k: arrays[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")},
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
            info=info,
            threshold=threshold,
        )

    def activate(self, pre: np.ndarray) -> np.ndarray:
        # (pre > threshold) * relu(pre): strict inequality, and a negative threshold still
        # cannot let a negative pre-activation through
        fire = (pre > self.threshold) & (pre > 0)
        return np.where(fire, pre, np.float32(0)).astype(np.float32, copy=False)
