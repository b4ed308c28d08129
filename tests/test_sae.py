import numpy as np
import pytest

from pertoken.errors import PertokenError
from pertoken.sae import JumpReLUSAE, ReLUSAE, SAEInfo, TopKSAE, sae_class
from pertoken.sae.load import load_sae, split_hub_spec
from tests.synthetic_sae import sae_arrays, write_gemma_scope, write_saelens

GS_PATH = "gemma-scope-9b-it-res/layer_19/width_16k/average_l0_91"


@pytest.fixture(autouse=True)
def fresh_cache():
    load_sae.cache_clear()
    yield
    load_sae.cache_clear()


def identity_sae(cls, **extra):
    eye = np.eye(4, dtype=np.float32)
    b_dec = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
    return cls(W_enc=eye, W_dec=eye * 2, b_enc=np.zeros(4, np.float32), b_dec=b_dec, **extra)


# ---------------------------------------------------------------- architectures
def test_jumprelu_thresholds_follow_conventions():
    thr = np.array([0.5, 0.5, -1.0, 0.5], np.float32)
    sae = identity_sae(JumpReLUSAE, threshold=thr)
    x = np.array([0.5, 0.6, -0.3, 0.4], np.float32)
    acts = sae.encode(x)
    # equal to threshold: off (strict >); above: the pre-activation itself, not shifted by
    # the threshold; a negative pre-activation stays off even under a negative threshold
    np.testing.assert_array_equal(acts, np.array([0.0, 0.6, 0.0, 0.0], np.float32))
    np.testing.assert_allclose(sae.decode(acts), acts @ (np.eye(4) * 2) + sae.b_dec, rtol=1e-6)


def test_jumprelu_matches_gemma_scope_formula_on_random_inputs():
    a = sae_arrays(seed=3)
    sae = JumpReLUSAE.from_arrays(a, {}, SAEInfo())
    x = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    pre = x @ a["W_enc"] + a["b_enc"]
    want = (pre > a["threshold"]) * np.maximum(pre, 0)
    got = sae.encode(x)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32 and 0 < (got > 0).sum() < got.size
    np.testing.assert_allclose(sae.decode(got), got @ a["W_dec"] + a["b_dec"], rtol=1e-5)


def test_topk_keeps_the_k_largest_positive():
    sae = identity_sae(TopKSAE, k=2)
    acts = sae.encode(np.array([[0.3, 2.0, 1.0, -5.0], [-1.0, -2.0, 0.5, -3.0]], np.float32))
    np.testing.assert_array_equal(acts, [[0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.5, 0.0]])


def test_relu_and_b_dec_subtraction():
    sae = identity_sae(ReLUSAE, apply_b_dec_to_input=True)
    x = np.array([2.0, -1.0, 3.5, 0.0], np.float32)
    np.testing.assert_array_equal(sae.encode(x), np.maximum(x - sae.b_dec, 0))


def test_registry_and_unknown_architecture():
    assert sae_class("jumprelu") is JumpReLUSAE and sae_class("TopK") is TopKSAE
    assert sae_class("standard") is ReLUSAE
    with pytest.raises(PertokenError, match="gated"):
        sae_class("gated")


def test_inconsistent_shapes_and_wrong_width_input():
    a = sae_arrays()
    a["b_dec"] = np.zeros(5, np.float32)
    with pytest.raises(PertokenError, match="b_dec"):
        JumpReLUSAE.from_arrays(a, {}, SAEInfo())
    sae = JumpReLUSAE.from_arrays(sae_arrays(), {}, SAEInfo())
    with pytest.raises(PertokenError, match="16-wide"):
        sae.encode(np.zeros(8, np.float32))


# ---------------------------------------------------------------- loaders
def test_npz_and_saelens_folder_give_the_same_sae(tmp_path):
    a = sae_arrays(seed=5)
    gs = load_sae(str(write_gemma_scope(tmp_path / GS_PATH, a) / "params.npz"))
    sl = load_sae(str(write_saelens(tmp_path / "sl", a, apply_b_dec_to_input=False)))
    assert type(gs) is type(sl) is JumpReLUSAE
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32) * 2
    np.testing.assert_array_equal(gs.encode(x), sl.encode(x))
    np.testing.assert_array_equal(gs.decode(gs.encode(x)), sl.decode(sl.encode(x)))


def test_npz_is_memory_mapped_float32_and_cached(tmp_path):
    folder = write_gemma_scope(tmp_path / GS_PATH, sae_arrays())
    sae = load_sae(str(folder))
    assert isinstance(sae.W_dec, np.memmap) and isinstance(sae.W_enc, np.memmap)
    assert sae.W_dec.dtype == np.float32 and (sae.d_model, sae.d_sae) == (16, 64)
    assert load_sae(str(folder)) is sae
    assert sae.info.layer == 19 and sae.info.width == "16k"
    assert sae.info.neuronpedia == "gemma-2-9b-it/19-gemmascope-res-16k"


def test_saelens_defaults_subtract_b_dec_and_read_hook_layer(tmp_path):
    a = sae_arrays(seed=7)
    meta = {"hook_name": "blocks.6.hook_resid_post", "neuronpedia_id": "gemma-2-2b/6-res-16k"}
    sae = load_sae(str(write_saelens(tmp_path / "s", a, metadata=meta)))
    x = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    pre = (x - a["b_dec"]) @ a["W_enc"] + a["b_enc"]
    np.testing.assert_allclose(
        sae.encode(x), (pre > a["threshold"]) * np.maximum(pre, 0), rtol=1e-5
    )
    assert sae.info.layer == 6 and sae.info.neuronpedia == "gemma-2-2b/6-res-16k"
    pre = load_sae(str(write_saelens(tmp_path / "p", a, hook_name="blocks.7.hook_resid_pre")))
    assert pre.info.layer == 6  # resid_pre of block 7 is the output of block 6: row 7


@pytest.mark.parametrize(
    "cfg",
    [
        {"architecture": "topk", "k": 3},
        {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}},
    ],
)
def test_saelens_topk_new_and_old_configs(tmp_path, cfg):
    a = sae_arrays()
    del a["threshold"]
    sae = load_sae(str(write_saelens(tmp_path / "t", a, **cfg)))
    assert isinstance(sae, TopKSAE) and sae.k == 3
    acts = sae.encode(np.random.default_rng(4).standard_normal((6, 16)).astype(np.float32))
    assert ((acts > 0).sum(axis=1) <= 3).all() and (acts > 0).any()


def test_saelens_bfloat16_weights_become_float32(tmp_path):
    a = sae_arrays()
    sae = load_sae(str(write_saelens(tmp_path / "b", a, dtype="bfloat16")))
    assert sae.W_dec.dtype == np.float32
    np.testing.assert_allclose(sae.W_dec, a["W_dec"], atol=1e-2)


def test_bad_sae_inputs_are_clear_errors(tmp_path):
    with pytest.raises(PertokenError, match="does not exist"):
        load_sae(str(tmp_path / "nope.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PertokenError, match="holds no SAE"):
        load_sae(str(tmp_path / "empty"))
    a = sae_arrays()
    del a["threshold"]
    with pytest.raises(PertokenError, match="lacks threshold"):
        load_sae(str(write_gemma_scope(tmp_path / "nothr", a)))
    with pytest.raises(PertokenError, match="d_sae=99"):
        load_sae(str(write_saelens(tmp_path / "mis", sae_arrays(), d_sae=99)))
    with pytest.raises(PertokenError, match="normalize_activations"):
        load_sae(
            str(
                write_saelens(
                    tmp_path / "norm",
                    sae_arrays(),
                    normalize_activations="expected_average_only_in",
                )
            )
        )
    folder = write_saelens(tmp_path / "noweights", sae_arrays())
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(PertokenError, match="sae_weights.safetensors is missing"):
        load_sae(str(folder))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PertokenError, match="not a readable .npz"):
        load_sae(str(tmp_path / "junk.npz"))


# ---------------------------------------------------------------- hub
def test_hub_specs_split_both_ways():
    want = ("google/gemma-scope-9b-it-res", "layer_19/width_16k/average_l0_91")
    assert split_hub_spec("google/gemma-scope-9b-it-res layer_19/width_16k/average_l0_91") == want
    assert split_hub_spec("google/gemma-scope-9b-it-res/layer_19/width_16k/average_l0_91") == want
    assert split_hub_spec("./local/folder/x") is None and split_hub_spec("a/b") is None


def test_hub_download_loads_and_names_the_release(tmp_path, monkeypatch):
    import huggingface_hub

    sub = "layer_19/width_16k/average_l0_91"
    write_gemma_scope(tmp_path / "snap" / sub, sae_arrays())
    calls = []

    def fake_snapshot(repo, allow_patterns=None, **kw):
        calls.append((repo, allow_patterns))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    sae = load_sae(f"google/gemma-scope-9b-it-res {sub}")
    assert calls == [("google/gemma-scope-9b-it-res", [f"{sub}/*"])]
    assert sae.info.release == "google/gemma-scope-9b-it-res" and sae.info.layer == 19
    assert sae.info.neuronpedia == "gemma-2-9b-it/19-gemmascope-res-16k"


def test_unreachable_hub_says_so_and_suggests_a_local_path(monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    def offline(*a, **kw):
        raise LocalEntryNotFoundError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(PertokenError, match="could not reach the Hugging Face hub.*local path"):
        load_sae("google/gemma-scope-2b-pt-res/layer_5/width_16k/average_l0_1")


# ---------------------------------------------------------------- SAELens fidelity
def saelens_topk_reference(a, x, k, rescale):
    """SAELens 6 TopKSAE.encode / decode (apply_b_dec_to_input), written out in numpy."""
    norms = np.linalg.norm(a["W_dec"], axis=-1)  # W_dec.norm(dim=-1)
    hidden_pre = (x - a["b_dec"]) @ a["W_enc"] + a["b_enc"]
    if rescale:
        hidden_pre = hidden_pre * norms
    idx = np.argsort(-hidden_pre, axis=-1)[..., :k]  # torch.topk
    acts = np.zeros_like(hidden_pre)
    np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(hidden_pre, idx, -1), 0), -1)
    recon = (acts / norms if rescale else acts) @ a["W_dec"] + a["b_dec"]
    return acts, recon


def test_topk_rescale_acts_by_decoder_norm_matches_saelens(tmp_path):
    a = sae_arrays(d_model=16, d_sae=64, seed=7)
    del a["threshold"]
    rng = np.random.default_rng(8)
    a["W_dec"] *= rng.uniform(0.1, 6.0, size=(64, 1)).astype(np.float32)  # unequal row norms
    cfg = dict(architecture="topk", k=5, apply_b_dec_to_input=True)
    sae = load_sae(str(write_saelens(tmp_path / "r", a, rescale_acts_by_decoder_norm=True, **cfg)))
    plain = load_sae(str(write_saelens(tmp_path / "p", a, **cfg)))
    x = rng.standard_normal((9, 16)).astype(np.float32)
    want, want_recon = saelens_topk_reference(a, x, 5, rescale=True)
    got = sae.encode(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sae.decode(got), want_recon, rtol=1e-4, atol=1e-5)
    # without the rescale other features win: the flag matters on these weights
    np.testing.assert_allclose(plain.encode(x), saelens_topk_reference(a, x, 5, False)[0], 1e-5)
    assert ((plain.encode(x) > 0) != (got > 0)).any()


def _rewrite_header(path, edit):
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_damaged_safetensors_are_one_line_errors(tmp_path):
    a = sae_arrays()
    nodtype = write_saelens(tmp_path / "nodtype", a)
    _rewrite_header(nodtype / "sae_weights.safetensors", lambda h: h["W_enc"].pop("dtype"))
    with pytest.raises(PertokenError, match=r"header entry of tensor W_enc lacks dtype"):
        load_sae(str(nodtype))
    short = write_saelens(tmp_path / "short", a)
    weights = short / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PertokenError, match=r"truncated or damaged; download it again"):
        load_sae(str(short))
    lying = write_saelens(tmp_path / "lying", a)
    _rewrite_header(lying / "sae_weights.safetensors", lambda h: h["b_dec"].update(shape=[99]))
    with pytest.raises(PertokenError, match=r"tensor b_dec needs bytes"):
        load_sae(str(lying))
