"""TopK SAEs: only the k largest pre-activations survive (then ReLU), as in SAELens `topk`.

With `rescale_acts_by_decoder_norm` (SAELens) the SAE was trained as if its decoder rows had
unit norm: pre-activations are multiplied by |W_dec[i]| before the top k are chosen, and
activations are divided by it again when decoding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pertoken.errors import PertokenError
from pertoken.sae.base import SAE, SAEInfo


@dataclass(eq=False)
class TopKSAE(SAE):
    k: int = 0
    rescale_acts_by_decoder_norm: bool = False

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
            rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        )

    def encode(self, x: np.ndarray) -> np.ndarray:
        pre = self.pre_acts(x)  # [..., d_sae]
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.decoder_norms  # chosen as if every decoder row had unit norm
        return self.activate(pre)

    def decode(self, acts: np.ndarray) -> np.ndarray:
        if self.rescale_acts_by_decoder_norm:
            # a zero decoder row never fires usefully; dividing by it must not make NaN
            acts, norms = np.asarray(acts, np.float32), self.decoder_norms
            acts = np.divide(acts, norms, out=np.zeros_like(acts, np.float32), where=norms > 0)
        return super().decode(acts)

    def activate(self, pre: np.ndarray) -> np.ndarray:
        top = np.argpartition(pre, -self.k, axis=-1)[..., -self.k :]  # [..., k]
        vals = np.take_along_axis(pre, top, axis=-1)
        acts = np.zeros_like(pre, dtype=np.float32)
        np.put_along_axis(acts, top, np.maximum(vals, 0), axis=-1)
        return acts
