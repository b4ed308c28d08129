"""Finetuning a transformers model: LoRA through peft, or every weight; steering (preventative
adds, CAFT ablation) during training only, through the same hooks as inference."""

from __future__ import annotations

from pathlib import Path

import torch

from pertoken.backends.steer import Steer
from pertoken.backends.torch.hooks import TapState, residual_taps
from pertoken.backends.torch.steering import steer_state
from pertoken.backends.training import ADAPTER, LORA_TARGETS, Batch, TrainSpec

_STATE = "trainer.pt"


class TorchTrainer:
    def __init__(self, backend, spec: TrainSpec, steer: Steer | None):
        self.backend, self.spec = backend, spec
        self.base = backend.model  # LoRA layers are injected into its modules in place
        # one line of steering broadcast over every batch line, at every position
        self.taps = TapState(steer=steer_state(self.base, [steer]) if steer else {})
        torch.manual_seed(spec.seed)
        if spec.method == "lora":
            self.net = _with_lora(self.base, spec)
        else:
            self.net = self.base
            for p in self.net.parameters():
                p.requires_grad_(True)
        self.params = {n: p for n, p in self.net.named_parameters() if p.requires_grad}
        self.opt = torch.optim.AdamW(self.params.values(), lr=spec.lr, weight_decay=0.0)
        self.device = torch.device(backend.device if backend.device != "auto" else "cuda")

    def step(self, batch: Batch) -> float:
        ids = torch.from_numpy(batch.ids).to(self.device)  # [B, T]
        valid = torch.from_numpy(batch.valid).to(self.device)
        targets = torch.from_numpy(batch.targets[:, 1:]).to(self.device)  # [B, T-1]
        with torch.enable_grad(), residual_taps(self.base, self.taps):
            logits = self.net(input_ids=ids, attention_mask=valid.long(), use_cache=False).logits
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
            )  # [B, T-1]
            loss = (nll * targets).sum() / targets.sum().clamp(min=1)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return float(loss.detach())

    def save_checkpoint(self, folder: Path) -> None:
        state = {
            "params": {n: p.detach().cpu() for n, p in self.params.items()},
            "optimizer": self.opt.state_dict(),
        }
        torch.save(state, Path(folder) / _STATE)

    def load_checkpoint(self, folder: Path) -> None:
        state = torch.load(Path(folder) / _STATE, weights_only=True, map_location=self.device)
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n])
        self.opt.load_state_dict(state["optimizer"])

    def save_model(self, folder: Path) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # pertoken reports its own progress
        folder = Path(folder)
        if self.spec.method == "lora":
            self.net.save_pretrained(folder / ADAPTER)
            self.net.merge_and_unload()  # folds B A into the base weights, in place
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base.eval()
        self.base.save_pretrained(folder)
        self.backend.tokenizer.save_pretrained(folder)


def _with_lora(model, spec: TrainSpec):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def make_trainer(backend, spec: TrainSpec, steer: Steer | None) -> TorchTrainer:
    return TorchTrainer(backend, spec, steer)
