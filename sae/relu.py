"""Standard ReLU SAEs (SAELens `standard`): every positive pre-activation fires."""

from __future__ import annotations

import numpy as np

from pertoken.sae.base import SAE


class ReLUSAE(SAE):
    architecture = "standard"

    def activate(self, pre: np.ndarray) -> np.ndarray:
        return np.maximum(pre, np.float32(0)).astype(np.float32, copy=False)
