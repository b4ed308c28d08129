"""Finetuning a transformers model: LoRA through peft, or every weight; edits on the residual
stream during training only (preventative steering, CAFT ablation)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from pertoken.backends.torch.hooks import decoder_parts
from pertoken.backends.training import ADAPTER, LORA_TARGETS, Batch, Edits, TrainSpec

_STATE = "trainer.pt"


@contextmanager
def training_edits(model, edits: Edits, device):
    """Hooks on the blocks' outputs for the duration of the block: ablate the directions of
    `edits.ablate[row]` (h - (h U^T) U), then add `edits.steer[row]`; always removed."""
    layers, _ = decoder_parts(model)
    steer = {r: torch.from_numpy(v).to(device) for r, v in edits.steer.items()}  # [hidden]
    ablate = {r: torch.from_numpy(u).to(device) for r, u in edits.ablate.items()}  # [k, hidden]

    def hook(row: int):
        def edit(_module, _args, output):
            h = output[0] if isinstance(output, tuple) else output  # [B, T, hidden]
            if row in ablate:
                u = ablate[row].to(h.dtype)
                h = h - (h @ u.T) @ u
            if row in steer:
                h = h + steer[row].to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return edit

    rows = sorted(set(steer) | set(ablate))
    handles = [layers[r - 1].register_forward_hook(hook(r)) for r in rows]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class TorchTrainer:
    def __init__(self, backend, spec: TrainSpec, edits: Edits):
        self.backend, self.spec, self.edits = backend, spec, edits
        self.base = backend.model  # LoRA layers are injected into its modules in place
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
        with torch.enable_grad(), training_edits(self.base, self.edits, self.device):
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


def make_trainer(backend, spec: TrainSpec, edits: Edits) -> TorchTrainer:
    return TorchTrainer(backend, spec, edits)
