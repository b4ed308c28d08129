"""Loading a transformers causal LM and its tokenizer, with clear errors."""

from __future__ import annotations

import warnings

from pertoken.backends.gguf import find_gguf
from pertoken.backends.source import locate
from pertoken.errors import PertokenError

DTYPES = ("float32", "bfloat16", "float16")


def pick_device(device: str | None) -> str:
    """auto (None): "auto" over several CUDA devices (the model is sharded), else cuda, else cpu."""
    import torch

    if device is None or device == "auto":
        if torch.cuda.device_count() > 1:
            return "auto"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "mps":
        warnings.warn(
            "the torch backend on mps is slow and its hooks are fragile; on Apple Silicon "
            "prefer --backend mlx",
            stacklevel=2,
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PertokenError("--device cuda was asked for but torch sees no CUDA device")
    return device


def pick_dtype(dtype: str | None, device: str) -> str:
    if dtype is None:
        return "bfloat16" if device.startswith("cuda") or device == "auto" else "float32"
    if dtype not in DTYPES:
        raise PertokenError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return dtype


def default_settings() -> dict:
    """What the backend picks without --device and --dtype; torch is imported only where it
    may see a CUDA device."""
    from pertoken.backends.machine import may_have_cuda

    device = pick_device(None) if may_have_cuda() else "cpu"
    return {"device": device, "dtype": pick_dtype(None, device)}


def load_model_and_tokenizer(model: str, dtype: str, device: str):
    """(model in eval mode on device, tokenizer); a missing folder or hub id is a PertokenError.
    device "auto" shards the model over the CUDA devices (transformers' device_map="auto")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # pertoken reports its own progress
    if (path := find_gguf(model)) is not None:
        return _load_gguf(path, dtype, device)
    src = locate(model)
    kw = {"local_files_only": True} if src.cache_only else {}
    try:
        tok = AutoTokenizer.from_pretrained(src.name, **kw)
    except ValueError as e:  # no tokenizer file transformers can read
        raise PertokenError(
            f"could not load the tokenizer of {model} ({_first_line(e)}): the model needs its "
            "tokenizer.json or tokenizer.model"
        ) from None
    except OSError as e:
        raise _load_error(model, e) from None
    placement = _placement(device)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            src.name, dtype=getattr(torch, dtype), **kw, **placement
        )
    except OSError as e:
        raise _load_error(model, e) from None
    return (lm if placement else lm.to(device)).eval(), tok


def _load_gguf(path, dtype: str, device: str):
    """transformers' GGUF reader: weights dequantised to `dtype`, tokenizer from the file."""
    import torch
    from transformers import AutoModelForCausalLM

    from pertoken.backends import gguf

    tok = gguf.load_tokenizer(path)
    folder, kw = gguf.hf_kwargs(path)
    placement = _placement(device)
    try:
        with gguf.quiet():
            lm = AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype), **kw, **placement
            )
    except (ValueError, KeyError, OSError) as e:
        raise gguf.unreadable(path, e) from None
    return (lm if placement else lm.to(device)).eval(), tok


def _load_error(model: str, e: Exception) -> PertokenError:
    return PertokenError(
        f"could not load {model}: {_first_line(e)} (check the id, your network and HF_TOKEN for "
        "gated models, or pass a local folder)"
    )


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _placement(device: str) -> dict:
    """from_pretrained's device_map for a sharded model (needs accelerate), else nothing."""
    if device != "auto":
        return {}
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise PertokenError(
            "sharding a model over several GPUs needs accelerate: pip install accelerate "
            "(or pick one GPU with --device cuda:0)"
        )
    return {"device_map": "auto"}
