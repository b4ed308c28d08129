"""The training side of a backend: one optimizer step on a batch, checkpoints, and the saved model.

Like the Backend protocol, everything crossing this boundary is numpy or plain Python; each
backend's trainer (backends/torch/train.py, backends/mlx/train.py) converts at its edge.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pertoken.backends.steer import Steer
from pertoken.errors import PertokenError

METHODS = ("lora", "full")
# The linear layers LoRA adapts in every decoder block (attention and MLP), on both backends.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "adapter"  # the LoRA adapter's sub-folder of a finetuned model folder (peft format)


@dataclass(frozen=True)
class TrainSpec:
    method: str = "lora"  # "lora" or "full"
    rank: int = 8
    alpha: float = 16.0  # LoRA scale = alpha / rank
    lr: float = 1e-4
    seed: int = 0


@dataclass
class Batch:
    """Right-padded token ids; a token is a target when it is part of an assistant turn."""

    ids: np.ndarray  # [B, T] int64
    targets: np.ndarray  # [B, T] bool: ids[b, t] is predicted from position t-1
    valid: np.ndarray  # [B, T] bool: real tokens (padding is False)

    @property
    def n_targets(self) -> int:
        return int(self.targets[:, 1:].sum())


class Trainer(Protocol):
    def step(self, batch: Batch) -> float:
        """One optimizer step; returns the mean cross-entropy over the batch's targets."""
        ...

    def save_checkpoint(self, folder: Path) -> None:
        """Trainable weights and optimizer state, enough to continue bit for bit."""
        ...

    def load_checkpoint(self, folder: Path) -> None: ...

    def save_model(self, folder: Path) -> None:
        """config, safetensors and tokenizer (LoRA merged), plus `adapter/` for LoRA; after
        this the backend the trainer was made from holds the merged, unsteered model."""
        ...


_TRAINERS = {"torch": "pertoken.backends.torch.train", "mlx": "pertoken.backends.mlx.train"}


def make_trainer(backend, spec: TrainSpec, steer: Steer | None = None) -> Trainer:
    """A trainer over `backend`'s loaded model (the model is trained in place). `steer` acts
    in every training forward through the backend's own steering (preventative steering,
    CAFT ablation) and is never saved."""
    if spec.method not in METHODS:
        raise PertokenError(f"--method must be one of {', '.join(METHODS)}, not {spec.method!r}")
    if spec.rank < 1:
        raise PertokenError(f"--rank must be at least 1, not {spec.rank}")
    if not spec.lr > 0:
        raise PertokenError(f"--lr must be positive, not {spec.lr}")
    module = importlib.import_module(_TRAINERS[backend.name])
    return module.make_trainer(backend, spec, steer)
