"""Where a model's files come from: a local folder, the Hugging Face hub, or the hub's cache.

Both backends locate a model here first, so a folder without a tokenizer, offline mode
(HF_HUB_OFFLINE) or a hub that does not answer is one clear line within seconds, before any
weights are read and without a minute of download retries.
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pertoken.errors import PertokenError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
PROBE_TIMEOUT = 2.5  # seconds: one request that tells whether the hub answers at all
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class ModelSource:
    """What to hand to from_pretrained / snapshot_download."""

    name: str  # a local folder or a hub id
    local: bool  # a folder on disk
    cache_only: bool = False  # a hub id read from the cache only (offline or unreachable hub)


def locate(model: str) -> ModelSource:
    """A checked local folder, or a hub id that can be fetched or is in the cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        check_folder(path)
        return ModelSource(str(path), local=True)
    if _looks_local(model):
        raise PertokenError(
            f"model folder {model} does not exist: give a local folder with config.json or a "
            "Hugging Face id like google/gemma-2-9b-it"
        )
    if offline_mode():
        if in_cache(model):
            return ModelSource(model, local=False, cache_only=True)
        raise PertokenError(
            f"{model} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it "
            f"where the hub is reachable ({_download(model)}) and pass its local folder"
        )
    if not hub_reachable():
        if in_cache(model):
            return ModelSource(model, local=False, cache_only=True)
        raise PertokenError(
            f"cannot reach the Hugging Face hub at {hub_endpoint()} and {model} is not in its "
            f"cache: download it elsewhere ({_download(model)}) and pass its local folder, or "
            "set HF_HUB_OFFLINE=1 with the model already in the cache"
        )
    return ModelSource(model, local=False)


def check_folder(path: Path) -> None:
    """A model folder needs config.json and a tokenizer."""
    if not (path / "config.json").is_file():
        raise PertokenError(
            f"{path} has no config.json: is this a model folder? Give the folder that holds "
            "config.json, the weights and the tokenizer"
        )
    if not has_tokenizer(path):
        raise PertokenError(
            f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}): copy the tokenizer "
            "files of the model it was saved from into the folder (tokenizer.save_pretrained)"
        )


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES) or any(path.glob("*.tiktoken"))


def offline_mode() -> bool:
    """huggingface_hub's (and transformers') offline switches."""
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in _TRUE for f in flags)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the hub answers one request at all (any HTTP status counts)."""
    request = urllib.request.Request(hub_endpoint(), method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if only with an error status
    except (OSError, ValueError):  # no route, refused, timed out, DNS failure, bad URL
        return False


def in_cache(model: str) -> bool:
    """Whether the hub cache holds a snapshot of `model` (its config.json)."""
    return cached_file(model, "config.json") is not None


def cached_file(model: str, name: str) -> Path | None:
    """A file of hub id `model` in the hub cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, name)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") != 1


def _download(model: str) -> str:
    return f"{hub_cli()} download {model} --local-dir {model.split('/')[-1]}"


def hub_cli() -> str:
    """huggingface_hub's command-line tool as installed: `hf` (0.34 on), else the older
    `huggingface-cli`; `hf` where neither is on PATH (what `pip install -U huggingface_hub`
    brings)."""
    here = os.path.dirname(sys.executable)  # a venv's bin folder, even when not on PATH
    for name in ("hf", "huggingface-cli"):
        if shutil.which(name) or shutil.which(name, path=here):
            return name
    return "hf"


def hub_login() -> str:
    """The command that logs in to the hub with the installed tool."""
    return "huggingface-cli login" if hub_cli() == "huggingface-cli" else "hf auth login"
