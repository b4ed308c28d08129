"""Time loading a Gemma Scope-sized SAE and using it: decompose one vector row and look up
per-token features. Writes a random SAE of the given size to a temp folder first.

    python benchmarks/sae_decompose.py --d-model 3584 --d-sae 16384 --tokens 512
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from pertoken.pipeline.decompose import decompose, load_sae, token_features
from pertoken.vectors import PersonaVector


def write_sae(folder: Path, d_model: int, d_sae: int) -> Path:
    rng = np.random.default_rng(0)
    w_dec = rng.standard_normal((d_sae, d_model), dtype=np.float32)
    np.savez(
        folder / "params.npz",
        W_enc=np.ascontiguousarray(w_dec.T),
        W_dec=w_dec,
        b_enc=np.zeros(d_sae, np.float32),
        b_dec=np.zeros(d_model, np.float32),
        threshold=np.full(d_sae, 20.0, np.float32),
    )
    return folder / "params.npz"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=3584)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        npz = write_sae(Path(tmp), args.d_model, args.d_sae)
        size_mb = npz.stat().st_size / 2**20
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        sae, t_load = timed(lambda: load_sae(str(npz)))
        _, t_again = timed(lambda: load_sae(str(npz)))
        vec = PersonaVector(np.random.default_rng(1).standard_normal((3, args.d_model), np.float32))
        _, t_dec = timed(lambda: decompose(vec, layer=1, sae=sae, top=20))
        _, t_dec2 = timed(lambda: decompose(vec, layer=2, sae=sae, top=20))
        hidden = np.random.default_rng(2).standard_normal((args.tokens, args.d_model), np.float32)
        _, t_tok = timed(lambda: token_features(sae, hidden, top=5))
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"SAE d_model={args.d_model} d_sae={args.d_sae}: params.npz {size_mb:.0f} MB")
    print(f"{'step':<34}{'seconds':>10}")
    for name, t in [
        ("load_sae (memory map)", t_load),
        ("load_sae again (cache)", t_again),
        ("decompose, first (decoder norms)", t_dec),
        ("decompose, second", t_dec2),
        (f"token_features, {args.tokens} tokens", t_tok),
    ]:
        print(f"{name:<34}{t:>10.3f}")
    print(
        f"peak RSS grew by {rss1 - rss0:.0f} MB during the run (includes the page cache of the map)"
    )


if __name__ == "__main__":
    main()
