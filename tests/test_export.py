import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.errors import PertokenError
from pertoken.pipeline.export import export_vector, import_vector
from pertoken.vectors import PersonaVector, load_vector, save_vector

N_LAYERS, HIDDEN = 6, 8


@pytest.fixture
def vec():
    data = np.random.default_rng(0).standard_normal((N_LAYERS + 1, HIDDEN)).astype(np.float32)
    return PersonaVector(data, {"model": "tiny-llama", "model_type": "llama", "trait": "evil"})


@pytest.fixture
def vector_path(tmp_path, vec):
    return save_vector(vec, tmp_path / "evil_response_avg_diff.pt")


def write_control_vector(path, directions, *, arch="controlvector", layer_count=None, dtype=None):
    """A control vector written the way repeng's export_gguf writes one."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string(f"{arch}.model_hint", "llama")
    w.add_uint32(f"{arch}.layer_count", layer_count or len(directions))
    for name, v in directions.items():
        w.add_tensor(name, v if dtype is None else v.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- round trips
def test_pt_round_trip_and_row_selection(tmp_path, vector_path, vec):
    res = export_vector(vector_path, out=tmp_path / "copy.pt")
    assert res.rows == list(range(N_LAYERS + 1)) and res.left_out == []
    back = load_vector(tmp_path / "copy.pt")
    np.testing.assert_array_equal(back.data, vec.data)
    assert back.meta["trait"] == "evil"
    export_vector(vector_path, out=tmp_path / "some.pt", layers=[3, 5])
    some = load_vector(tmp_path / "some.pt").data
    np.testing.assert_array_equal(some[[3, 5]], vec.data[[3, 5]])
    assert not some[[0, 1, 2, 4, 6]].any()


def test_safetensors_round_trip_one_tensor_per_row(tmp_path, vector_path, vec):
    from safetensors import safe_open

    out = export_vector(vector_path, out=tmp_path / "v.safetensors").path
    with safe_open(str(out), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(f"layer.{r}" for r in range(N_LAYERS + 1))
        assert f.get_tensor("layer.4").shape == (HIDDEN,)
        meta = f.metadata()
    assert meta["n_layers"] == str(N_LAYERS) and meta["hidden_size"] == str(HIDDEN)
    back = import_vector(out, out=tmp_path / "back.pt")
    np.testing.assert_array_equal(back.data, vec.data)
    assert back.meta["trait"] == "evil"
    np.testing.assert_array_equal(load_vector(tmp_path / "back.pt").data, vec.data)


def test_gguf_round_trip_restores_rows_2_to_n(tmp_path, vector_path, vec):
    res = export_vector(vector_path, out=tmp_path / "v.gguf")
    assert res.format == "gguf" and res.rows == list(range(2, N_LAYERS + 1))
    assert res.left_out == [0, 1]
    back = import_vector(res.path, out=tmp_path / "back.pt")
    assert back.data.shape == vec.data.shape
    np.testing.assert_array_equal(back.data[2:], vec.data[2:])
    assert not back.data[:2].any()
    assert back.meta["model_hint"] == "llama"
    np.testing.assert_array_equal(load_vector(tmp_path / "back.pt").data, back.data)


# ---------------------------------------------------------------- what llama.cpp reads
def test_gguf_file_is_a_llama_cpp_control_vector(tmp_path, vector_path, vec):
    path = export_vector(vector_path, out=tmp_path / "v.gguf", fmt="gguf").path
    r = gguf.GGUFReader(str(path))
    assert r.get_field("general.architecture").contents() == "controlvector"
    assert r.get_field("controlvector.model_hint").contents() == "llama"
    count = r.get_field("controlvector.layer_count")
    assert count.types == [gguf.GGUFValueType.UINT32] and count.contents() == N_LAYERS - 1
    names = [t.name for t in r.tensors]
    # row L -> direction.{L-1}; llama.cpp rejects direction.0, so it never appears
    assert names == [f"direction.{n}" for n in range(1, N_LAYERS)]
    for t in r.tensors:
        n = int(t.name.split(".")[1])
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [HIDDEN] and t.n_elements == HIDDEN
        np.testing.assert_array_equal(t.data, vec.data[n + 1])


def test_gguf_explicit_layers(tmp_path, vector_path):
    path = export_vector(vector_path, out=tmp_path / "v.gguf", layers=[5, 3, 3]).path
    assert [t.name for t in gguf.GGUFReader(str(path)).tensors] == ["direction.2", "direction.4"]
    for bad in ([1, 3], [0]):
        with pytest.raises(PertokenError, match="cannot go into a GGUF"):
            export_vector(vector_path, out=tmp_path / "bad.gguf", layers=bad)
    with pytest.raises(PertokenError, match="outside"):
        export_vector(vector_path, out=tmp_path / "bad.gguf", layers=[N_LAYERS + 1])


# ---------------------------------------------------------------- import of foreign files
def test_import_repeng_style_file(tmp_path):
    # repeng trains layers 1..n_layers-1 of a 4-block model and counts its directions
    dirs = {f"direction.{n}": np.full(HIDDEN, n, np.float32) for n in (3, 2, 1)}
    path = write_control_vector(tmp_path / "repeng.gguf", dirs)
    vec = import_vector(path)
    assert vec.n_layers == 4 and vec.hidden_size == HIDDEN
    assert [vec.data[r][0] for r in range(5)] == [0, 0, 1, 2, 3]
    wider = import_vector(path, n_layers=10)
    assert wider.n_layers == 10 and not wider.data[5:].any()
    with pytest.raises(PertokenError, match="--n-layers"):
        import_vector(path, n_layers=2)


def test_import_rejects_what_llama_cpp_rejects(tmp_path):
    v = np.ones(HIDDEN, np.float32)
    zero = write_control_vector(tmp_path / "zero.gguf", {"direction.0": v})
    with pytest.raises(PertokenError, match="direction.N, N >= 1"):
        import_vector(zero)
    half = write_control_vector(tmp_path / "f16.gguf", {"direction.1": v}, dtype=np.float16)
    with pytest.raises(PertokenError, match="F32"):
        import_vector(half)
    model = write_control_vector(tmp_path / "model.gguf", {"direction.1": v}, arch="llama")
    with pytest.raises(PertokenError, match="not a control vector"):
        import_vector(model)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF nonsense")
    with pytest.raises(PertokenError, match="not a readable GGUF"):
        import_vector(tmp_path / "junk.gguf")
    with pytest.raises(PertokenError, match="does not exist"):
        import_vector(tmp_path / "missing.gguf")


def test_unknown_format_is_an_error(tmp_path, vector_path):
    with pytest.raises(PertokenError, match="--format"):
        export_vector(vector_path, out=tmp_path / "v.bin")


# ---------------------------------------------------------------- commands
def test_cli_export_and_import(tmp_path, vector_path, vec):
    run = CliRunner().invoke
    r = run(main, ["export", str(vector_path), "--format", "gguf", "--out", str(tmp_path / "v")])
    assert r.exit_code == 0, r.output
    assert "rows 0-1 left out" in r.output and f"rows 2..{N_LAYERS}" in r.output
    r = run(main, ["import", str(tmp_path / "v"), "--out", str(tmp_path / "b.pt")])
    assert r.exit_code == 1 and "cannot tell the format" in r.output
    (tmp_path / "v").rename(tmp_path / "v.gguf")
    r = run(main, ["import", str(tmp_path / "v.gguf"), "--out", str(tmp_path / "b.pt")])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(load_vector(tmp_path / "b.pt").data[2:], vec.data[2:])
    r = run(main, ["export", str(vector_path), "--out", str(tmp_path / "x.gguf"), "--layers", "1"])
    assert r.exit_code == 1 and "error:" in r.output and "direction.0" in r.output
