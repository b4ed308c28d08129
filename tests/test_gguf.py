"""GGUF files as --model: finding the file, MLX's native and dequantised reads, row order.

The whole path on a real GGUF (both backends, greedy parity, logits) is in test_real_model.py."""

import numpy as np
import pytest

from pertoken.backends.gguf import find_gguf, model_id
from pertoken.errors import PertokenError


def _write(path, tensors):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for name, (arr, qtype) in tensors.items():
        w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_find_gguf_file_folder_and_refusals(tmp_path):
    assert find_gguf(str(tmp_path)) is None  # an empty folder is not a GGUF model
    (tmp_path / "m.Q4_0.gguf").write_bytes(b"")
    assert find_gguf(str(tmp_path)) == tmp_path / "m.Q4_0.gguf"
    assert find_gguf(str(tmp_path / "m.Q4_0.gguf")) == tmp_path / "m.Q4_0.gguf"
    assert model_id(str(tmp_path)) == "m.Q4_0"
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf(str(tmp_path)) is None  # a Hugging Face folder wins
    (tmp_path / "config.json").unlink()
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(PertokenError, match="several GGUF files.*pass one file"):
        find_gguf(str(tmp_path))
    with pytest.raises(PertokenError, match="does not exist"):
        find_gguf(str(tmp_path / "missing.gguf"))


def test_find_gguf_one_folder_down(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "model.gguf").write_bytes(b"")
    assert find_gguf(str(tmp_path)) == tmp_path / "pkg" / "model.gguf"


def test_mlx_reads_q4_q8_natively_and_dequantises_other_types(tmp_path):
    pytest.importorskip("mlx.core")
    import gguf
    import mlx.core as mx

    from pertoken.backends.mlx.gguf import read_weights

    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 64)).astype(np.float32)
    Q = gguf.GGMLQuantizationType
    native = _write(tmp_path / "n.gguf", {"w": (a, Q.Q4_1), "e": (a, Q.Q8_0), "n": (a[0], Q.F32)})
    w, quantised = read_weights(native)
    assert quantised and w["w"].dtype == mx.uint32
    for name, bits, qtype in (("w", 4, Q.Q4_1), ("e", 8, Q.Q8_0)):
        # in float32 (the model's dtype on CPU) MLX's numbers are the file's numbers
        scales, biases = (w[f"{name}.{k}"].astype(mx.float32) for k in ("scales", "biases"))
        got = mx.dequantize(w[name], scales, biases, 32, bits)
        want = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
        np.testing.assert_allclose(np.array(got), want, atol=1e-6)
    mixed = _write(tmp_path / "m.gguf", {"w": (a, Q.Q5_0), "v": (a, Q.Q4_0)})
    w, quantised = read_weights(mixed)
    assert not quantised and w["w"].dtype == mx.float32 and w["w"].shape == (8, 64)
    want = gguf.quants.dequantize(gguf.quants.quantize(a, Q.Q5_0), Q.Q5_0)
    np.testing.assert_array_equal(np.array(w["w"]), want)
    assert np.abs(np.array(w["w"]) - a).max() < 0.2  # Q5_0 keeps the values, roughly


def test_unpermute_undoes_llama_cpp_rotary_order():
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    from pertoken.backends.mlx.gguf import _unpermute

    heads, head_dim, cols = 3, 8, 5
    w = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    # convert_hf_to_gguf.py's permute for q_proj / k_proj
    permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(np.array(_unpermute(mx.array(permuted), heads)), w)
