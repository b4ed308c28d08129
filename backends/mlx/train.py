"""Finetuning pertoken's own MLX models: LoRA layers (mlx-lm's, quantized bases included) or
every weight; steering (preventative adds, CAFT ablation) during training only, through the
same Pass as inference."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from pertoken.atomic import write_text_atomic
from pertoken.backends.mlx.batch import SteerPlan, window_of
from pertoken.backends.mlx.models.residual import Pass, attend_mask
from pertoken.backends.steer import Steer
from pertoken.backends.training import ADAPTER, LORA_TARGETS, Batch, TrainSpec
from pertoken.errors import PertokenError


class MLXTrainer:
    def __init__(self, backend, spec: TrainSpec, steer: Steer | None):
        self.backend, self.spec, self.model = backend, spec, backend.model
        plan = SteerPlan.of(steer, backend._mx_dtype)  # every line alike, every position
        self.steer = plan.vectors if plan is not None else {}
        mx.random.seed(spec.seed)
        self.model.freeze()
        if spec.method == "lora":
            self.lora = _add_lora(self.model, spec)
        else:
            if _quantized(self.model):
                raise PertokenError(
                    "full finetuning needs unquantized weights: use --method lora on a "
                    "quantized model, or load its full-precision checkpoint"
                )
            self.model.unfreeze()
            self.lora = []
        # bias-corrected, as torch's AdamW: the first steps are then not three times as large
        self.opt = optim.AdamW(learning_rate=spec.lr, weight_decay=0.0, bias_correction=True)
        self.opt.init(self.model.trainable_parameters())
        self.loss_and_grad = nn.value_and_grad(self.model, self._loss)

    def _loss(self, ids: mx.array, targets: mx.array, valid: mx.array) -> mx.array:
        T = ids.shape[1]
        window = window_of(self.model)
        p = Pass(
            mask=attend_mask(valid, T),
            window_mask=attend_mask(valid, T, window) if window else None,
            steer=self.steer,
        )
        logits = self.model(ids, None, p)  # [B, T, vocab]
        nll = nn.losses.cross_entropy(logits[:, :-1].astype(mx.float32), ids[:, 1:])  # [B, T-1]
        w = targets[:, 1:].astype(mx.float32)
        return (nll * w).sum() / mx.maximum(w.sum(), 1)

    def step(self, batch: Batch) -> float:
        ids = mx.array(batch.ids.astype(np.int32))
        loss, grads = self.loss_and_grad(ids, mx.array(batch.targets), mx.array(batch.valid))
        self.opt.update(self.model, grads)
        mx.eval(loss, self.model.trainable_parameters(), self.opt.state)
        return float(loss)

    def save_checkpoint(self, folder: Path) -> None:
        folder = Path(folder)
        mx.save_safetensors(str(folder / "weights.safetensors"),
                            dict(tree_flatten(self.model.trainable_parameters())))  # fmt: skip
        mx.save_safetensors(
            str(folder / "optimizer.safetensors"), dict(tree_flatten(self.opt.state))
        )

    def load_checkpoint(self, folder: Path) -> None:
        folder = Path(folder)
        weights = mx.load(str(folder / "weights.safetensors"))
        self.model.load_weights(list(weights.items()), strict=False)
        self.opt.state = tree_unflatten(
            list(mx.load(str(folder / "optimizer.safetensors")).items())
        )
        mx.eval(self.model.parameters(), self.opt.state)

    def save_model(self, folder: Path) -> None:
        """Fused weights under the checkpoint's own names, its config and tokenizer files, and
        for LoRA the adapter in peft's format (what transformers + peft read)."""
        folder = Path(folder)
        if self.lora:
            _save_adapter(self.lora, self.spec, self.backend.model_id, folder / ADAPTER)
            fused = [(name, layer.fuse()) for name, layer in self.lora]
            self.model.update_modules(tree_unflatten(fused))
        self.model.freeze()
        weights = dict(tree_flatten(self.model.parameters()))
        mx.eval(weights)
        mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
        config = {**self.backend.config, "torch_dtype": self.backend.dtype}
        write_text_atomic(folder / "config.json", json.dumps(config, indent=2) + "\n")
        gen = self.backend.generation_config
        if gen:
            write_text_atomic(folder / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        self.backend.tokenizer.save_pretrained(folder)


def _quantized(model) -> bool:
    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def _add_lora(model, spec: TrainSpec) -> list[tuple[str, nn.Module]]:
    """Wrap the target linears of every block in mlx-lm's LoRALinear (scale alpha / rank, as
    peft's); returns (module path, LoRA layer) pairs."""
    from mlx_lm.tuner.lora import LoRALinear

    made = []
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS and isinstance(
            m, (nn.Linear, nn.QuantizedLinear)
        ):
            made.append((name, LoRALinear.from_base(m, r=spec.rank, scale=spec.alpha / spec.rank)))
    if not made:
        raise PertokenError("this model has no q/k/v/o or MLP projections for LoRA to adapt")
    model.update_modules(tree_unflatten(made))
    return made


def _save_adapter(lora, spec: TrainSpec, base: str, folder: Path) -> None:
    """peft's adapter_model.safetensors (lora_A [r, in], lora_B [out, r]) and adapter_config."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in lora:
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = layer.lora_a.T.astype(mx.float32)
        tensors[f"{key}.lora_B.weight"] = layer.lora_b.T.astype(mx.float32)
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), tensors,
                        metadata={"format": "pt"})  # fmt: skip
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(LORA_TARGETS), "fan_in_fan_out": False,
    }  # fmt: skip
    write_text_atomic(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")


def make_trainer(backend, spec: TrainSpec, steer: Steer | None) -> MLXTrainer:
    return MLXTrainer(backend, spec, steer)
