"""pertoken's own MLX model definitions, by Hugging Face `model_type`."""

from __future__ import annotations

from pertoken.errors import PertokenError

# model_type -> module under pertoken.backends.mlx.models
SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gemma2": "gemma2"}


def check_supported(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise PertokenError(
            f"the mlx backend does not support model_type {model_type!r}: supported are "
            f"{', '.join(SUPPORTED)} (Llama 3.x, Mistral, Qwen 2.x, Gemma 2); "
            "try --backend torch for other architectures"
        )
    return model_type


def get_classes(config: dict):
    """(Model, ModelArgs) for a config, in the form mlx-lm's `load_model` expects."""
    import importlib

    module = SUPPORTED[check_supported(config)]
    mod = importlib.import_module(f"pertoken.backends.mlx.models.{module}")
    return mod.Model, mod.ModelArgs
