"""The SAE interface shared by every architecture: numpy in, numpy out, float32 throughout, so
both backends can use it. Weights may be read-only memory maps; nothing here copies them."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import numpy as np

from pertoken.errors import PertokenError


@dataclass
class SAEInfo:
    """Where an SAE came from and what it reads (all optional)."""

    spec: str = ""
    layer: int | None = None  # the block whose residual output it reads (Gemma Scope layer_{n})
    release: str | None = None  # e.g. "google/gemma-scope-9b-it-res"
    width: str | None = None  # e.g. "16k"
    hook: str | None = None  # TransformerLens hook name, e.g. "blocks.19.hook_resid_post"
    neuronpedia: str | None = None  # "{model}/{source}", the feature URL without its index


@dataclass(eq=False)
class SAE:
    """A sparse autoencoder: encode(x) -> feature activations, decode(acts) -> x_hat.

    pre = (x - b_dec if apply_b_dec_to_input) @ W_enc + b_enc; each subclass turns `pre` into
    activations in `activate`."""

    W_enc: np.ndarray  # [d_model, d_sae]
    W_dec: np.ndarray  # [d_sae, d_model]
    b_enc: np.ndarray  # [d_sae]
    b_dec: np.ndarray  # [d_model]
    apply_b_dec_to_input: bool = False
    info: SAEInfo = field(default_factory=SAEInfo)

    architecture: ClassVar[str] = ""

    def __post_init__(self):
        d_model, d_sae = self.W_enc.shape
        want = {"W_dec": (d_sae, d_model), "b_enc": (d_sae,), "b_dec": (d_model,)}
        for name, shape in want.items():
            got = getattr(self, name).shape
            if got != shape:
                raise PertokenError(
                    f"SAE {self.info.spec or ''} has {name} of shape {list(got)}, expected "
                    f"{list(shape)} for W_enc {[d_model, d_sae]}: the SAE files are inconsistent"
                )

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], cfg: dict, info: SAEInfo) -> SAE:
        """Build from named arrays (W_enc, W_dec, b_enc, b_dec, ...) and a config dict."""
        return cls(
            **{k: arrays[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")},
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
            info=info,
        )

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @cached_property
    def decoder_norms(self) -> np.ndarray:
        """|W_dec[i]| per feature, [d_sae] float32, computed once."""
        # einsum avoids a W_dec-sized temporary of squares
        return np.sqrt(np.einsum("ij,ij->i", self.W_dec, self.W_dec)).astype(np.float32)

    def pre_acts(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)  # [..., d_model]
        if x.shape[-1] != self.d_model:
            raise PertokenError(
                f"the SAE reads {self.d_model}-wide vectors but got {x.shape[-1]}: use an SAE "
                "trained on the same model as the vector or activations"
            )
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc  # [..., d_sae]

    def activate(self, pre: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encode(self, x: np.ndarray) -> np.ndarray:
        """x [..., d_model] -> feature activations [..., d_sae] float32."""
        return self.activate(self.pre_acts(x))

    def decode(self, acts: np.ndarray) -> np.ndarray:
        """acts [..., d_sae] -> reconstruction [..., d_model] float32."""
        return np.asarray(acts, dtype=np.float32) @ self.W_dec + self.b_dec
