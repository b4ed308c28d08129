"""Reading checkpoints and tokenizers through mlx-lm, into pertoken's own model classes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from pertoken.backends.gguf import find_gguf
from pertoken.backends.mlx.models import SUPPORTED, check_supported, get_classes
from pertoken.backends.source import cached_file, check_folder, hub_login, locate
from pertoken.errors import PertokenError

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object  # the Hugging Face tokenizer
    config: dict
    path: Path
    model_id: str
    dtype: str
    device: str


def model_path(model: str) -> Path:
    """A local folder, or a hub id fetched (or found in the cache) with huggingface_hub."""
    src = locate(model)
    if src.local:
        return Path(src.name)
    from huggingface_hub import snapshot_download

    try:
        path = Path(
            snapshot_download(model, allow_patterns=_PATTERNS, local_files_only=src.cache_only)
        )
    except Exception as e:
        raise PertokenError(
            f"could not find model {model!r} as a folder or on the Hugging Face hub "
            f"({type(e).__name__}): check the name, your network and `{hub_login()}`"
        ) from None
    check_folder(path)
    return path


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        msg = f"cannot read {path / 'config.json'}: {e}; is this a model folder?"
        raise PertokenError(msg) from None


def local_config(model: str) -> dict:
    """config.json of a local folder or of a hub snapshot in the cache ({} when neither)."""
    path = Path(model).expanduser() / "config.json"
    path = path if path.is_file() else cached_file(model, "config.json")
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def pick_device(device: str | None) -> str:
    gpu = mx.metal.is_available()
    device = ("gpu" if gpu else "cpu") if device in (None, "auto") else device
    device = "gpu" if device == "mps" else device
    if device not in ("gpu", "cpu"):
        raise PertokenError(f"the mlx backend runs on gpu or cpu, not {device!r}")
    if device == "gpu" and not gpu:
        raise PertokenError("no Metal GPU here: use --device cpu with the mlx backend")
    return device


def pick_dtype(dtype: str | None, config: dict, device: str) -> str:
    """float32 on CPU; on the GPU the checkpoint's half type, else bfloat16."""
    if dtype is None:
        stored = config.get("torch_dtype") or config.get("dtype")
        half = stored if stored in ("bfloat16", "float16") else "bfloat16"
        return "float32" if device == "cpu" else half
    if dtype not in DTYPES:
        raise PertokenError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype


def default_settings() -> dict:
    """What the backend picks without --device and --dtype, for a half-precision repo."""
    device = pick_device(None)
    return {"device": device, "dtype": pick_dtype(None, {}, device)}


def load(model: str, *, dtype: str | None = None, device: str | None = None) -> Loaded:
    """Load a supported checkpoint (HF folder, hub id or an mlx-community quantized repo)."""
    from mlx_lm.utils import load_model, load_tokenizer

    if (gguf_path := find_gguf(model)) is not None:
        return load_gguf(gguf_path, dtype=dtype, device=device)
    path = model_path(model)
    config = read_config(path)
    check_supported(config)
    device = pick_device(device)
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    dtype = pick_dtype(dtype, config, device)
    try:
        net, config = load_model(path, get_model_classes=get_classes)
    except (FileNotFoundError, ValueError) as e:
        raise PertokenError(f"cannot load weights from {path}: {e}") from None
    net.set_dtype(DTYPES[dtype])
    _materialise(net)
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))._tokenizer
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PertokenError(f"could not load the tokenizer in {path}: {first}") from None
    model_id = path.name if Path(model).expanduser().is_dir() else model
    return Loaded(net, tokenizer, config, path, model_id, dtype, device)


def load_gguf(path: Path, *, dtype: str | None, device: str | None) -> Loaded:
    """A GGUF Llama-family file: quantised layers where MLX reads the type, floats otherwise."""
    from pertoken.backends import gguf
    from pertoken.backends.mlx.gguf import hf_names, quantize_like, read_weights

    config = gguf.load_config(path)
    if SUPPORTED[check_supported(config)] != "llama":
        raise PertokenError(
            f"the mlx backend reads GGUF files of the Llama family, not {config['model_type']}: "
            "use --backend torch for this file"
        )
    device = pick_device(device)
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    dtype = pick_dtype(dtype, config, device)
    weights, quantised = read_weights(path)
    weights = hf_names(weights, config)
    model_cls, args_cls = get_classes(config)
    net = model_cls(args_cls.from_dict(config))
    if quantised:
        quantize_like(net, weights)
    net.load_weights(list(net.sanitize(weights).items()), strict=True)
    net.set_dtype(DTYPES[dtype])
    _materialise(net)
    tokenizer = gguf.load_tokenizer(path)
    return Loaded(net, tokenizer, config, path.parent, path.stem, dtype, device)


def _materialise(net: nn.Module) -> None:
    """Evaluate every array of the model, private ones such as rope frequencies included: a lazy
    array belongs to the stream of the thread that made it, and a server decodes on another."""
    mx.eval([v for _, m in net.named_modules() for v in m.values() if isinstance(v, mx.array)])


def generation_config(path: Path) -> dict:
    """generation_config.json when the checkpoint has one (it may add EOS ids)."""
    try:
        return json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
