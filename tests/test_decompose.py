import json

import numpy as np
import pytest
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.errors import PertokenError
from pertoken.pipeline.decompose import (
    decompose,
    format_table,
    load_sae,
    sae_row,
    token_features,
)
from pertoken.vectors import PersonaVector, save_vector
from tests.synthetic_sae import plant, sae_arrays, write_gemma_scope, write_saelens

N_LAYERS, HIDDEN, PLANTED = 6, 16, 37
GS_PATH = "gemma-scope-9b-it-res/layer_{}/width_16k/average_l0_91"


@pytest.fixture(autouse=True)
def fresh_cache():
    load_sae.cache_clear()
    yield
    load_sae.cache_clear()


@pytest.fixture
def vector_path(tmp_path):
    data = np.random.default_rng(11).standard_normal((N_LAYERS + 1, HIDDEN)).astype(np.float32)
    return save_vector(PersonaVector(data), tmp_path / "evil_response_avg_diff.pt")


def planted_arrays(vector_path, row):
    import torch

    v = torch.load(vector_path, weights_only=True).numpy()[row]
    a = sae_arrays(seed=1)
    plant(a, PLANTED, v * 2.0)  # same direction, other length: cosine exactly 1
    return a


def test_planted_feature_ranks_first_by_cosine_and_by_encoding(tmp_path, vector_path):
    row = 4
    folder = write_gemma_scope(tmp_path / GS_PATH.format(row - 1), planted_arrays(vector_path, row))
    res = decompose(vector_path, layer=row, sae=str(folder), top=5)
    assert res.by_cosine[0].id == PLANTED and res.by_cosine[0].cos == pytest.approx(1, abs=1e-5)
    assert res.by_encoding[0].id == PLANTED
    assert [f.cos for f in res.by_cosine] == sorted((f.cos for f in res.by_cosine), reverse=True)
    assert res.by_cosine[1].cos < 0.99 and len(res.by_cosine) == 5
    acts = [f.act for f in res.by_encoding]
    assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
    assert res.warnings == []
    # row L is Gemma Scope layer_{L-1}: Neuronpedia source "{L-1}-gemmascope-res-16k"
    want = f"https://www.neuronpedia.org/gemma-2-9b-it/{row - 1}-gemmascope-res-16k/{PLANTED}"
    assert res.by_cosine[0].url == want


def test_npz_and_saelens_decompose_the_same(tmp_path, vector_path):
    a = planted_arrays(vector_path, 3)
    npz = decompose(vector_path, layer=3, sae=str(write_gemma_scope(tmp_path / "g", a)))
    sl_dir = write_saelens(tmp_path / "s", a, apply_b_dec_to_input=False)
    sl = decompose(vector_path, layer=3, sae=str(sl_dir))
    assert [(f.id, f.cos, f.act) for f in npz.by_cosine] == [
        (f.id, f.cos, f.act) for f in sl.by_cosine
    ]
    assert [f.id for f in npz.by_encoding] == [f.id for f in sl.by_encoding]


def test_layer_mismatch_warns_with_the_offset(tmp_path, vector_path):
    folder = write_gemma_scope(tmp_path / GS_PATH.format(4), sae_arrays())
    res = decompose(vector_path, layer=4, sae=str(folder))
    assert len(res.warnings) == 1
    assert "layer_4" in res.warnings[0] and "--layer 5" in res.warnings[0]
    assert res.sae_layer == 4 and sae_row(load_sae(str(folder))) == 5


def test_width_mismatch_and_zero_row_are_errors(tmp_path, vector_path):
    wide = write_gemma_scope(tmp_path / "wide", sae_arrays(d_model=32))
    with pytest.raises(PertokenError, match="32-wide.*16 wide"):
        decompose(vector_path, layer=3, sae=str(wide))
    vec = PersonaVector(np.zeros((N_LAYERS + 1, HIDDEN), np.float32))
    ok = write_gemma_scope(tmp_path / "ok", sae_arrays())
    with pytest.raises(PertokenError, match="all zeros"):
        decompose(vec, layer=2, sae=str(ok))
    with pytest.raises(PertokenError, match="outside"):
        decompose(vector_path, layer=N_LAYERS + 1, sae=str(ok))


def test_token_features_matches_encoding_and_chunks(tmp_path):
    a = sae_arrays(seed=2)
    sae = load_sae(str(write_gemma_scope(tmp_path / "t", a)))
    hidden = np.random.default_rng(5).standard_normal((300, HIDDEN)).astype(np.float32)
    hidden[7] = 0  # nothing fires on a zero residual (b_enc is below every threshold)
    feats = token_features(sae, hidden, top=4)  # 300 tokens span two chunks
    assert len(feats) == 300 and feats[7] == []
    full = sae.encode(hidden)  # [T, d_sae]
    for t in (0, 150, 299):
        want = [i for i in np.argsort(-full[t], kind="stable")[:4] if full[t, i] > 0]
        assert [f["id"] for f in feats[t]] == want
        assert [f["act"] for f in feats[t]] == pytest.approx([float(full[t, i]) for i in want])
        assert all(isinstance(f["id"], int) and isinstance(f["act"], float) for f in feats[t])
    # a token along a planted feature's encoder direction lights it up first
    plant(a, PLANTED, np.eye(HIDDEN, dtype=np.float32)[3])
    planted = load_sae(str(write_gemma_scope(tmp_path / "p", a)))
    assert token_features(planted, np.eye(HIDDEN, dtype=np.float32)[[3]] * 4)[0][0]["id"] == 37
    with pytest.raises(PertokenError, match="wide"):
        token_features(sae, np.zeros((2, 8), np.float32))


def test_format_table_lists_both_rankings(tmp_path, vector_path):
    folder = write_gemma_scope(tmp_path / GS_PATH.format(2), planted_arrays(vector_path, 3))
    text = format_table(decompose(vector_path, layer=3, sae=str(folder), top=3))
    assert "by cosine" in text and "by SAE encoding" in text
    assert f"gemmascope-res-16k/{PLANTED}" in text


def test_cli_decompose_prints_table_and_writes_json(tmp_path, vector_path):
    folder = write_gemma_scope(tmp_path / GS_PATH.format(2), planted_arrays(vector_path, 3))
    out = tmp_path / "d.json"
    args = ["decompose", "--vector", str(vector_path), "--layer", "3", "--sae", str(folder)]
    r = CliRunner().invoke(main, [*args, "--top", "4", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert f"{PLANTED:>8}" in r.output
    data = json.loads(out.read_text())
    assert data["layer"] == 3 and len(data["by_cosine"]) == 4
    assert data["by_cosine"][0]["id"] == PLANTED and data["by_cosine"][0]["url"].endswith("/37")
    r = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "missing.npz")])
    assert r.exit_code == 1 and "error:" in r.output and "does not exist" in r.output
