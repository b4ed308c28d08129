"""`pertoken finetune`: train a model on chat JSONL (LoRA or every weight), optionally with
preventative steering or CAFT ablation in every training forward, into a model folder that
`--model DIR` loads on both backends.

The output folder holds one run: `finetune.json` names its data and settings (written first,
complete when training ends), `checkpoint/` a resumable state after Ctrl-C; a rerun of the same
command resumes, a different one is refused.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pertoken.atomic import atomic_folder, write_text_atomic
from pertoken.backends.steer import Steer
from pertoken.backends.training import METHODS, TrainSpec, make_trainer
from pertoken.errors import PertokenError
from pertoken.lock import output_lock
from pertoken.pipeline.finetune.data import (
    batches_of_epoch,
    encode_chats,
    file_sha256,
    make_batch,
    read_chats,
)
from pertoken.pipeline.finetune.edits import edit_records, training_steer
from pertoken.pipeline.finetune.interrupt import deferred_interrupt
from pertoken.pipeline.finetune.plots import loss_plot
from pertoken.version import __version__

RECORD = "finetune.json"
CHECKPOINT = "checkpoint"
# What makes two runs the same run: a rerun with these equal resumes, else it is refused.
SAME_RUN = ("model", "backend", "dtype", "data_sha256", "method", "rank", "alpha", "epochs",
            "lr", "batch_size", "max_length", "seed", "edits")  # fmt: skip
DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}


@dataclass
class FinetuneOptions:
    model: str
    data: str | Path
    out: str | Path
    backend: str = "auto"
    method: str = "lora"
    rank: int = 8
    alpha: float | None = None  # default 2 * rank
    epochs: int = 1
    lr: float | None = None  # default 1e-4 for LoRA, 1e-5 for full
    batch_size: int = 8
    max_length: int = 1024
    seed: int = 0
    steer: list[str] = field(default_factory=list)  # "V.pt:LAYER:COEF"
    ablate: list[str] = field(default_factory=list)  # "V.pt:LAYER"
    dtype: str | None = None
    device: str | None = None
    progress: bool = True


@dataclass
class FinetuneResult:
    out_dir: Path
    record: dict  # finetune.json
    resumed_at: int  # the step training resumed from (0: from the start)
    done_before: bool  # the folder already held this finished run
    backend: object | None = None  # the trained model in memory (None when done_before)


def finetune(opts: FinetuneOptions, *, on_step: Callable[[int, float], None] | None = None):
    """Train `opts.model` on `opts.data` into the folder `opts.out` (see the module doc).

    on_step(step, loss) is called after every optimizer step."""
    _check_options(opts)
    chats = read_chats(opts.data)
    settings = _settings(opts)
    folder = Path(opts.out)
    with output_lock(folder, folder=True):
        previous = _previous(folder, settings)
        if previous is not None and previous.get("complete"):
            return FinetuneResult(folder, previous, 0, True)
        _check_memory(opts)
        from pertoken.backends import load_backend

        backend = load_backend(opts.model, opts.backend, dtype=opts.dtype, device=opts.device)
        steer = training_steer(backend, opts.steer, opts.ablate)
        examples, skipped = encode_chats(backend, chats, opts.max_length)
        settings |= {"examples": len(examples), "skipped": skipped}
        write_text_atomic(folder / RECORD, json.dumps({**settings, "complete": False}, indent=2))
        job = _Job(backend, settings, examples, steer, opts.progress, on_step)
        record, resumed = job.run(folder)
        return FinetuneResult(folder, record, resumed, False, backend)


def _check_options(opts: FinetuneOptions) -> None:
    """Settings that cannot train, refused before the folder records anything."""
    if opts.method not in METHODS:
        raise PertokenError(f"--method must be one of {', '.join(METHODS)}, not {opts.method!r}")
    minimum = {"--epochs": (opts.epochs, 1), "--batch-size": (opts.batch_size, 1),
               "--rank": (opts.rank, 1), "--max-length": (opts.max_length, 2)}  # fmt: skip
    for name, (value, least) in minimum.items():
        if value < least:
            raise PertokenError(f"{name} must be at least {least}, not {value}")
    for name, value in (("--lr", opts.lr), ("--alpha", opts.alpha)):
        if value is not None and not value > 0:
            raise PertokenError(f"{name} must be positive, not {value}")


def _settings(opts: FinetuneOptions) -> dict:
    from pertoken.backends import resolve

    return {
        "pertoken": __version__,
        "model": str(opts.model),
        "backend": resolve(opts.backend),
        "dtype": opts.dtype,
        "data": str(opts.data),
        "data_sha256": file_sha256(opts.data),
        "method": opts.method,
        "rank": opts.rank,
        "alpha": float(opts.alpha if opts.alpha is not None else 2 * opts.rank),
        "epochs": opts.epochs,
        "lr": float(opts.lr if opts.lr is not None else DEFAULT_LR.get(opts.method, 1e-4)),
        "batch_size": opts.batch_size,
        "max_length": opts.max_length,
        "seed": opts.seed,
        "edits": edit_records(opts.steer, opts.ablate),
    }


def _previous(folder: Path, settings: dict) -> dict | None:
    """The folder's record when it holds this run; refused when it holds anything else."""
    others = [p.name for p in folder.iterdir() if p.name != ".lock"] if folder.is_dir() else []
    if not others:
        return None
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        raise PertokenError(
            f"{folder} is not empty and holds no pertoken finetune ({', '.join(sorted(others)[:3])}"
            "...): give --out a new or empty folder"
        ) from None
    changed = [k for k in SAME_RUN if record.get(k) != settings.get(k)]
    if changed:
        raise PertokenError(
            f"{folder} holds another finetune (its {', '.join(changed)} differ): give --out a "
            "new folder, or delete that one to start over"
        )
    return record


def _check_memory(opts: FinetuneOptions) -> None:
    """As `run` does: a model that will not fit fails before loading; full finetuning also
    holds gradients and two Adam moments, about four times the weights."""
    from pertoken.backends import check_memory
    from pertoken.backends.machine import gb

    fit = check_memory(opts.model, opts.backend, dtype=opts.dtype, max_new_tokens=opts.max_length)
    if fit is None or opts.method != "full" or not fit.weights or not fit.usable:
        return
    need = 4 * fit.weights.bytes
    if need > fit.usable:
        raise PertokenError(
            f"full finetuning of {opts.model} needs ~{gb(need)} (weights, gradients and Adam "
            f"state), more than the ~{gb(fit.usable)} available: use --method lora"
        )


class _Job:
    """The training loop over one run's steps, resumable from a checkpoint."""

    def __init__(self, backend, settings, examples, steer: Steer | None, progress, on_step):
        self.backend, self.settings, self.examples = backend, settings, examples
        self.progress, self.on_step = progress, on_step
        spec = TrainSpec(settings["method"], settings["rank"], settings["alpha"],
                         settings["lr"], settings["seed"])  # fmt: skip
        self.trainer = make_trainer(backend, spec, steer)
        self.per_epoch = math.ceil(len(examples) / settings["batch_size"])
        self.total = self.per_epoch * settings["epochs"]
        self.losses: list[float] = []
        self.tokens, self.seconds = 0, 0.0
        self._epoch: dict[int, list] = {}  # the batches of the epoch being trained

    def run(self, folder: Path) -> tuple[dict, int]:
        start = self._resume(folder / CHECKPOINT)
        bar = _bar(self.total, start, self.progress)
        pad = int(getattr(self.backend, "pad_id", 0) or 0)
        with deferred_interrupt() as stop:
            for step in range(start, self.total):
                batch = make_batch(self._chats_of(step), pad)
                t0 = time.perf_counter()
                loss = self.trainer.step(batch)
                self.seconds += time.perf_counter() - t0
                self.losses.append(loss)
                self.tokens += int(batch.valid.sum())
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens / self.seconds:.0f}")
                if self.on_step is not None:
                    self.on_step(step, loss)
                if step + 1 == self.total:
                    break
                if stop.requested or (step + 1) % self.per_epoch == 0:
                    # each epoch's end too, so a killed run loses at most one epoch
                    self._save_checkpoint(folder / CHECKPOINT, step + 1)
                if stop.requested:
                    bar.close()
                    raise KeyboardInterrupt
        bar.close()
        return self._finish(folder), start

    def _chats_of(self, step: int) -> list:
        epoch, k = divmod(step, self.per_epoch)
        if epoch not in self._epoch:
            size, seed = self.settings["batch_size"], self.settings["seed"]
            self._epoch = {epoch: batches_of_epoch(self.examples, size, seed, epoch)}
        return self._epoch[epoch][k]

    def _resume(self, ckpt: Path) -> int:
        try:
            state = json.loads((ckpt / "state.json").read_text())
        except (OSError, ValueError):
            return 0
        self.trainer.load_checkpoint(ckpt)
        self.losses, self.tokens, self.seconds = state["loss"], state["tokens"], state["seconds"]
        return int(state["step"])

    def _save_checkpoint(self, ckpt: Path, step: int) -> None:
        """Into a fresh folder renamed over the old one, so a checkpoint is whole or absent."""
        with atomic_folder(ckpt) as tmp:
            self.trainer.save_checkpoint(tmp)
            state = {
                "step": step,
                "loss": self.losses,
                "tokens": self.tokens,
                "seconds": self.seconds,
            }
            write_text_atomic(tmp / "state.json", json.dumps(state))

    def _finish(self, folder: Path) -> dict:
        self.trainer.save_model(folder)
        loss_plot(self.losses, self.per_epoch, folder / "loss.png")
        epochs = [self.losses[e : e + self.per_epoch] for e in range(0, self.total, self.per_epoch)]
        record = {
            **self.settings,
            "steps": self.total,
            "loss": self.losses,
            "epoch_loss": [sum(e) / len(e) for e in epochs],
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / max(self.seconds, 1e-9), 1),
            "complete": True,
        }
        write_text_atomic(folder / RECORD, json.dumps(record, indent=2) + "\n")
        shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)
        return record


def _bar(total: int, start: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", desc="finetune", disable=not progress)
