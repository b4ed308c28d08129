"""Config fields that mlx-lm 0.32 reads from the wrong place."""

from __future__ import annotations


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), scaling


def layer_types(config: dict, n_layers: int) -> list[str]:
    """Which layers use a sliding window (`sliding_attention`) and which see everything."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    if config.get("model_type") == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if config.get("model_type") == "mistral" and config.get("sliding_window"):
        return ["sliding_attention"] * n_layers
    return ["full_attention"] * n_layers
