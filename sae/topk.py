"""TopK SAEs: only the k largest pre-activations survive (then ReLU), as in SAELens `topk`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pertoken.errors import PertokenError
from pertoken.sae.base import SAE, SAEInfo


@dataclass(eq=False)
class TopKSAE(SAE):
    k: int = 0

    architecture = "topk"

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.k <= self.d_sae:
            raise PertokenError(
                f"TopK SAE {self.info.spec} has k={self.k}, outside 1..{self.d_sae}: "
                "set `k` in its cfg.json"
            )

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], cfg: dict, info: SAEInfo) -> SAE:
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0
        return cls(
            **{key: arrays[key] for key in ("W_enc", "W_dec", "b_enc", "b_dec")},
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
            info=info,
            k=int(k),
        )

    def activate(self, pre: np.ndarray) -> np.ndarray:
        top = np.argpartition(pre, -self.k, axis=-1)[..., -self.k :]  # [..., k]
        vals = np.take_along_axis(pre, top, axis=-1)
        acts = np.zeros_like(pre, dtype=np.float32)
        np.put_along_axis(acts, top, np.maximum(vals, 0), axis=-1)
        return acts
