"""Load an SAE from a spec: a Gemma Scope `params.npz` (or its folder), a SAELens folder
(`cfg.json` + `sae_weights.safetensors`), or the same on the Hugging Face hub as "REPO PATH"
or "REPO/PATH". Loaded SAEs are cached per spec: a 16k x 3584 SAE is ~470 MB of float32."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from pertoken.errors import PertokenError
from pertoken.sae import SAE, SAEInfo, sae_class
from pertoken.sae.files import read_npz, read_safetensors

# Neuronpedia's model ids for the Gemma Scope residual releases (docs/CONVENTIONS.md)
NEURONPEDIA_MODELS = {"2b-pt": "gemma-2-2b", "9b-pt": "gemma-2-9b", "9b-it": "gemma-2-9b-it"}
SAELENS_WEIGHTS = "sae_weights.safetensors"
_LAYOUTS = (
    "a params.npz (Gemma Scope) or a folder with cfg.json + sae_weights.safetensors (SAELens)"
)


def load_sae(spec: str) -> SAE:
    """The SAE named by `spec` (local path, or "REPO PATH" / "REPO/PATH" on the hub), cached."""
    return _load_cached(str(spec).strip())


@functools.cache
def _load_cached(spec: str) -> SAE:
    path = Path(spec).expanduser()
    if path.exists():
        return load_local(path, spec=spec)
    hub = split_hub_spec(spec)
    if hub is None:
        raise PertokenError(f"SAE {spec} does not exist: pass {_LAYOUTS}, or a hub 'REPO PATH'")
    repo, sub = hub
    return load_local(_download(repo, sub, spec), spec=spec)


load_sae.cache_clear = _load_cached.cache_clear  # type: ignore[attr-defined]


def split_hub_spec(spec: str) -> tuple[str, str] | None:
    """'owner/repo path/in/repo' or 'owner/repo/path/in/repo' -> (repo, path); None if neither."""
    if " " in spec:
        repo, sub = spec.split(None, 1)
        return (repo, sub.strip("/")) if repo.count("/") == 1 else None
    parts = spec.strip("/").split("/")
    if spec.startswith(("/", ".", "~")) or len(parts) < 3:
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def load_local(path: Path, *, spec: str) -> SAE:
    """Load a Gemma Scope npz / folder or a SAELens folder from disk."""
    if path.is_dir():
        if (path / "params.npz").is_file():
            return load_gemma_scope(path / "params.npz", spec=spec)
        if (path / "cfg.json").is_file():
            return load_saelens(path, spec=spec)
        raise PertokenError(f"{path} holds no SAE: point --sae at {_LAYOUTS}")
    if path.suffix == ".npz":
        return load_gemma_scope(path, spec=spec)
    if path.name == "cfg.json" or path.suffix == ".safetensors":
        return load_saelens(path.parent, spec=spec)
    raise PertokenError(f"{path} is not an SAE file: point --sae at {_LAYOUTS}")


def load_gemma_scope(npz: Path, *, spec: str) -> SAE:
    """A Gemma Scope `params.npz`: W_enc, W_dec, b_enc, b_dec, threshold; JumpReLU."""
    arrays = {_upper_w(k): v for k, v in read_npz(npz).items()}
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k not in arrays]
    if missing:
        raise PertokenError(
            f"{npz} lacks {', '.join(missing)}: a Gemma Scope params.npz holds "
            "W_enc, W_dec, b_enc, b_dec and threshold"
        )
    info = gemma_scope_info(f"{spec} {npz}")
    info.spec = spec
    return sae_class("jumprelu").from_arrays(arrays, {"apply_b_dec_to_input": False}, info)


def load_saelens(folder: Path, *, spec: str) -> SAE:
    """A SAELens folder: cfg.json (architecture, d_in, d_sae, k, ...) + sae_weights.safetensors."""
    cfg_path, weights = folder / "cfg.json", folder / SAELENS_WEIGHTS
    for p in (cfg_path, weights):
        if not p.is_file():
            raise PertokenError(
                f"{p} is missing: a SAELens SAE folder holds cfg.json + {SAELENS_WEIGHTS}"
            )
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PertokenError(f"{cfg_path} is not valid JSON ({e}): fix or re-download it") from None
    cfg = saelens_config(raw, cfg_path)
    arrays = read_safetensors(weights)
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in arrays]
    if missing:
        raise PertokenError(f"{weights} lacks {', '.join(missing)}: not a SAELens SAE")
    d_in, d_sae = arrays["W_enc"].shape
    if (cfg.get("d_in", d_in), cfg.get("d_sae", d_sae)) != (d_in, d_sae):
        raise PertokenError(
            f"{cfg_path} says d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')} but W_enc is "
            f"{[d_in, d_sae]}: the config and weights do not belong together"
        )
    info = _saelens_info(cfg, spec)
    return sae_class(cfg["architecture"]).from_arrays(arrays, cfg, info)


def saelens_config(raw: dict, where: Path | str = "cfg.json") -> dict:
    """Normalise SAELens cfg.json keys across versions (pre-6 flat keys, 6.x `metadata`)."""
    meta = raw.get("metadata") or raw.get("meta") or {}
    cfg = {**meta, **raw}
    arch = cfg.get("architecture") or "standard"
    act = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    if arch == "standard" and act == "topk":
        arch = "topk"  # pre-6 SAELens spelled TopK as a standard SAE with a topk activation
    norm = cfg.get("normalize_activations")
    norm = "none" if norm in (None, False) else "expected_average_only_in" if norm is True else norm
    if norm != "none":
        raise PertokenError(
            f"{where}: normalize_activations={norm!r} is not supported; fold the scaling into "
            "the weights (SAELens `fold_activation_norm_scaling_factor`) and save it again"
        )
    cfg["architecture"] = arch
    cfg["apply_b_dec_to_input"] = cfg.get("apply_b_dec_to_input", True)
    cfg["hook_name"] = cfg.get("hook_name") or cfg.get("hook_point")
    return cfg


def _saelens_info(cfg: dict, spec: str) -> SAEInfo:
    info = gemma_scope_info(spec)
    info.spec = spec
    hook = cfg.get("hook_name") or ""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook)
    if m:
        # resid_pre of block n is resid_post of block n-1 (-1: the embedding, row 0)
        info.layer = int(m.group(1)) - (m.group(2) == "pre")
    elif hook:
        info.layer = None  # not a residual-stream SAE: no row matches it
    if cfg.get("neuronpedia_id"):
        info.neuronpedia = cfg["neuronpedia_id"]
    info.hook = hook or info.hook
    return info


def gemma_scope_info(text: str) -> SAEInfo:
    """Layer, width, release and Neuronpedia source read from a Gemma Scope path or hub spec."""
    info = SAEInfo()
    if m := re.search(r"layer_(\d+)", text):
        info.layer = int(m.group(1))
        info.hook = f"blocks.{info.layer}.hook_resid_post"
    if m := re.search(r"width_(\d+[km])", text):
        info.width = m.group(1)
    m = re.search(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att)", text)
    if m:
        info.release = f"google/{m.group(0)}"
        model = NEURONPEDIA_MODELS.get(f"{m.group(1)}-{m.group(2)}")
        if model and m.group(3) == "res" and info.layer is not None and info.width:
            info.neuronpedia = f"{model}/{info.layer}-gemmascope-res-{info.width}"
    return info


def _upper_w(key: str) -> str:
    return "W_" + key[2:] if key.startswith("w_") else key


def _download(repo: str, sub: str, spec: str) -> Path:
    import huggingface_hub as hf
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    where = f"{sub} from {repo} on the Hugging Face hub"
    try:
        if sub.endswith((".npz", ".json", ".safetensors")):
            if sub.endswith(".npz"):
                return Path(hf.hf_hub_download(repo, sub))
            sub = sub.rsplit("/", 1)[0] if "/" in sub else ""
        root = hf.snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
    except (LocalEntryNotFoundError, ConnectionError, TimeoutError) as e:
        raise PertokenError(
            f"could not reach the Hugging Face hub to fetch {where} ({type(e).__name__}) and "
            f"no local path {spec!r} exists: download the SAE folder where the hub is reachable "
            "and pass its local path to --sae"
        ) from None
    except GatedRepoError:
        raise PertokenError(
            f"{repo} is gated: accept its terms on huggingface.co and log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise PertokenError(
            f"no repo {repo} on the Hugging Face hub and no local path {spec!r}: check the SAE spec"
        ) from None
    except (EntryNotFoundError, HfHubHTTPError) as e:
        raise PertokenError(f"could not fetch {where} ({e}): check the path in the repo") from None
    folder = Path(root) / sub
    if not folder.is_dir():
        raise PertokenError(
            f"found nothing under {sub} in {repo}: check the path at https://huggingface.co/{repo}"
        )
    return folder
