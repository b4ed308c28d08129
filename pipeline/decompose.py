"""Explain a persona-vector row in SAE features: the features whose decoder directions point
along the row (cosine), and the features that fire when the SAE encodes the row itself. Also
the per-token feature lookup that monitoring uses."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pertoken.atomic import write_text_atomic
from pertoken.errors import PertokenError
from pertoken.sae import SAE
from pertoken.sae.load import load_sae
from pertoken.vectors import PersonaVector, load_vector

NEURONPEDIA = "https://www.neuronpedia.org"
_TOKEN_CHUNK = 256  # tokens encoded at once: bounds the [T, d_sae] activations in memory


@dataclass
class Feature:
    id: int
    cos: float  # cosine of the feature's decoder direction with the vector row
    act: float  # the feature's activation when the SAE encodes the vector row
    url: str | None = None  # Neuronpedia page, for known releases


@dataclass
class Decomposition:
    vector: str
    layer: int
    sae: str
    sae_layer: int | None
    d_sae: int
    norm: float  # |vector row|
    by_cosine: list[Feature]
    by_encoding: list[Feature]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


def decompose(
    vector: str | Path | PersonaVector, *, layer: int, sae: str | SAE, top: int = 20
) -> Decomposition:
    """Top `top` features of row `layer` of `vector` under the SAE `sae` (spec or SAE).

    Row L is read by Gemma Scope `layer_{L-1}`; a mismatch is reported in `warnings`."""
    vec = vector if isinstance(vector, PersonaVector) else load_vector(vector)
    model = sae if isinstance(sae, SAE) else load_sae(sae)
    name = "vector" if isinstance(vector, PersonaVector) else str(vector)
    row = vec.row(layer)  # [hidden]
    check_width(model, vec.hidden_size, name)
    norm = float(np.linalg.norm(row))
    if norm == 0:
        raise PertokenError(f"row {layer} of {name} is all zeros: pick a layer it was extracted at")
    cos = decoder_cosines(model, row)  # [d_sae]
    acts = model.encode(row)  # [d_sae]
    by_cos = _top(cos, top)
    by_act = [i for i in _top(acts, top) if acts[i] > 0]
    return Decomposition(
        vector=name,
        layer=layer,
        sae=model.info.spec,
        sae_layer=model.info.layer,
        d_sae=model.d_sae,
        norm=norm,
        by_cosine=[_feature(model, i, cos, acts) for i in by_cos],
        by_encoding=[_feature(model, i, cos, acts) for i in by_act],
        warnings=[w for w in [layer_warning(model, layer)] if w],
    )


def decoder_cosines(sae: SAE, v: np.ndarray) -> np.ndarray:
    """cos(W_dec[i], v) for every feature i, [d_sae] float32 (0 for a zero decoder row)."""
    dots = sae.W_dec @ np.asarray(v, dtype=np.float32)  # [d_sae]
    scale = sae.decoder_norms * np.float32(np.linalg.norm(v))
    return np.divide(dots, scale, out=np.zeros_like(dots), where=scale > 0)


def token_features(sae: SAE, hidden: np.ndarray, *, top: int = 5) -> list[list[dict]]:
    """Per token, the `top` most active features as [{"id", "act"}], strongest first.

    hidden: [T, d_model] residuals at the SAE's layer. Tokens where nothing fires get []."""
    hidden = np.asarray(hidden, dtype=np.float32)
    if hidden.ndim != 2:
        raise PertokenError(f"token_features needs [T, d_model] activations, got {hidden.shape}")
    check_width(sae, hidden.shape[1], "the activations")
    out: list[list[dict]] = []
    for start in range(0, len(hidden), _TOKEN_CHUNK):
        acts = sae.encode(hidden[start : start + _TOKEN_CHUNK])  # [t, d_sae]
        for a in acts:
            out.append([{"id": int(i), "act": float(a[i])} for i in _top(a, top) if a[i] > 0])
    return out


def check_width(sae: SAE, hidden_size: int, what: str) -> None:
    if sae.d_model != hidden_size:
        raise PertokenError(
            f"SAE {sae.info.spec} reads {sae.d_model}-wide residuals but {what} is "
            f"{hidden_size} wide: use an SAE trained on the model the vector came from"
        )


def layer_warning(sae: SAE, layer: int) -> str | None:
    """A warning when the SAE reads another place than vector row `layer` (row L = layer_{L-1})."""
    info = sae.info
    if info.layer is None:
        if info.hook:
            return f"the SAE reads {info.hook}, not the residual stream that vector rows hold"
        return None
    if info.layer != layer - 1:
        where = info.hook or f"blocks.{info.layer}.hook_resid_post"
        return (
            f"the SAE reads layer_{info.layer} ({where}), which is vector row {info.layer + 1}, "
            f"but row {layer} was asked for: use --layer {info.layer + 1}, or the SAE for "
            f"layer_{layer - 1}"
        )
    return None


def sae_feature_hook(
    spec: str, *, rows: list[int], hidden_size: int, layer: int | None = None, top: int = 5
):
    """A monitor `on_trace` hook adding each token's top SAE features at the SAE's row.

    The row is `layer`, else the SAE's own (Gemma Scope layer_n reads row n+1); it must be one
    of the monitored rows, whose captured states the hook reuses."""
    sae = load_sae(spec)
    row = layer if layer is not None else sae_row(sae)
    if row is None:
        raise PertokenError(f"SAE {spec} does not say which layer it reads: pass --sae-layer L")
    if row not in rows:
        raise PertokenError(
            f"SAE {spec} reads row {row}, which is not monitored: add {row} to --layers"
        )
    check_width(sae, hidden_size, "this model")

    def hook(record: dict, trace) -> None:
        hidden = trace.hidden[:, list(trace.rows).index(row)]  # [T, hidden]
        record["features"] = token_features(sae, hidden, top=top)
        record["settings"] = {**record.get("settings", {}), "sae_layer": row}

    return hook


def sae_row(sae: SAE) -> int | None:
    """The vector row the SAE reads (Gemma Scope layer_{n} -> row n+1), None when unknown."""
    return None if sae.info.layer is None else sae.info.layer + 1


def neuronpedia_url(sae: SAE, index: int) -> str | None:
    """The feature's Neuronpedia page when the SAE is a known release, else None."""
    return f"{NEURONPEDIA}/{sae.info.neuronpedia}/{index}" if sae.info.neuronpedia else None


def format_table(result: Decomposition) -> str:
    """The two rankings as plain-text tables for the terminal."""
    lines = [
        f"{result.vector} row {result.layer} (|v| = {result.norm:.3g}) in {result.sae} "
        f"({result.d_sae} features)"
    ]
    for title, feats in [
        ("by cosine with decoder directions", result.by_cosine),
        ("by SAE encoding of the vector", result.by_encoding),
    ]:
        lines += ["", title, f"{'rank':>4}  {'feature':>8}  {'cos':>7}  {'act':>9}  link"]
        lines += [
            f"{r:>4}  {f.id:>8}  {f.cos:>7.3f}  {f.act:>9.3f}  {f.url or ''}"
            for r, f in enumerate(feats, 1)
        ]
        if not feats:
            lines.append("      (none: no feature fires on the vector itself)")
    return "\n".join(lines)


def _top(values: np.ndarray, k: int) -> list[int]:
    k = min(k, len(values))
    if k <= 0:
        return []
    idx = np.argpartition(values, -k)[-k:]
    return [int(i) for i in idx[np.argsort(-values[idx], kind="stable")]]


def _feature(sae: SAE, i: int, cos: np.ndarray, acts: np.ndarray) -> Feature:
    return Feature(id=i, cos=float(cos[i]), act=float(acts[i]), url=neuronpedia_url(sae, i))


__all__ = [
    "Decomposition",
    "Feature",
    "decompose",
    "decoder_cosines",
    "format_table",
    "layer_warning",
    "load_sae",
    "neuronpedia_url",
    "sae_row",
    "token_features",
]
