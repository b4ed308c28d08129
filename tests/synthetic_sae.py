"""Small random SAEs written in the Gemma Scope and SAELens layouts, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def sae_arrays(d_model: int = 16, d_sae: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """W_enc [d_model, d_sae], W_dec [d_sae, d_model] (unit rows), b_enc, b_dec, threshold."""
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((d_sae, d_model)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    return {
        "W_enc": (w_dec.T * 1.5).astype(np.float32),
        "W_dec": w_dec,
        "b_enc": rng.normal(0, 0.05, d_sae).astype(np.float32),
        "b_dec": rng.normal(0, 0.1, d_model).astype(np.float32),
        "threshold": np.abs(rng.normal(0.3, 0.1, d_sae)).astype(np.float32),
    }


def plant(arrays: dict[str, np.ndarray], index: int, direction: np.ndarray) -> None:
    """Make feature `index` decode to `direction` and fire strongly along it."""
    unit = direction / np.linalg.norm(direction)
    arrays["W_dec"][index] = direction
    arrays["W_enc"][:, index] = unit * 5.0
    arrays["threshold"][index] = 0.01


def write_gemma_scope(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **arrays)
    return folder


def write_saelens(
    folder: Path, arrays: dict[str, np.ndarray], dtype: str = "float32", **cfg
) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    d_model, d_sae = arrays["W_enc"].shape
    config = {"architecture": "jumprelu", "d_in": d_model, "d_sae": d_sae, "dtype": dtype}
    config.update(cfg)
    (folder / "cfg.json").write_text(json.dumps(config))
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(tdtype) for k, v in arrays.items()}
    save_file(tensors, folder / "sae_weights.safetensors")
    return folder
