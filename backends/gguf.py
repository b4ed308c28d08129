"""GGUF checkpoints as `--model`: a `.gguf` file, or a folder that holds one.

Configuration, tokenizer, chat template and special tokens come from the file's metadata
through transformers' GGUF reader, so both backends see the same text side; weights are read
by each backend (transformers dequantises for torch; MLX keeps what it reads natively)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from pertoken.errors import PertokenError


def find_gguf(model: str) -> Path | None:
    """The GGUF file `model` names (a file, or a folder without config.json holding one)."""
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise PertokenError(f"GGUF file {model} does not exist: check the path")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf")) or sorted(path.glob("*/*.gguf"))
    if len(found) > 1:
        names = ", ".join(str(f.relative_to(path)) for f in found[:4])
        raise PertokenError(f"{model} holds several GGUF files ({names}): pass one file as --model")
    return found[0] if found else None


def model_id(model: str) -> str | None:
    """A GGUF model's name for output columns (the file's stem), None for other models."""
    path = find_gguf(model)
    return path.stem if path else None


def hf_kwargs(path: Path) -> tuple[str, dict]:
    """(folder, keyword arguments) for transformers' from_pretrained of a GGUF file."""
    return str(path.parent), {"gguf_file": path.name}


def load_tokenizer(path: Path):
    """The Hugging Face tokenizer rebuilt from the file (vocabulary, merges, specials and the
    chat template)."""
    from transformers import AutoTokenizer

    folder, kw = hf_kwargs(path)
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
    except (ValueError, KeyError, OSError) as e:
        raise unreadable(path, e) from None
    if not getattr(tok, "chat_template", None):
        raise PertokenError(
            f"{path.name} carries no chat template (tokenizer.chat_template): pertoken needs "
            "an instruction-tuned model's GGUF with its template"
        )
    return tok


def load_config(path: Path) -> dict:
    """The model's configuration as transformers reads it from the file, as a dict."""
    from transformers import AutoConfig

    folder, kw = hf_kwargs(path)
    try:
        return AutoConfig.from_pretrained(folder, **kw).to_dict()
    except (ValueError, KeyError, OSError) as e:
        raise unreadable(path, e) from None


@contextmanager
def quiet():
    """transformers' GGUF reader draws its own progress bar; pertoken reports its own."""
    import transformers.modeling_gguf_pytorch_utils as reader

    saved = reader.tqdm
    reader.tqdm = lambda items, **_: items
    try:
        yield
    finally:
        reader.tqdm = saved


def unreadable(path: Path, e: Exception) -> PertokenError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return PertokenError(
        f"cannot read GGUF file {path}: {first} (transformers reads GGUF Llama, Mistral, Qwen 2 "
        "and Gemma 2 models; check the architecture and that the download is complete)"
    )
