import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.errors import PertokenError
from pertoken.pipeline.export import export_vector, import_vector
from pertoken.pipeline.options import Generation
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


# ---------------------------------------------------------------- hostile sizes
def test_huge_layer_count_is_refused_before_allocating(tmp_path):
    v = np.ones(HIDDEN, np.float32)
    path = write_control_vector(tmp_path / "big.gguf", {"direction.1": v}, layer_count=1 << 27)
    assert path.stat().st_size < 2000
    with pytest.raises(PertokenError, match=r"layer_count = 134217728.*--n-layers"):
        import_vector(path, out=tmp_path / "big.pt")
    assert not (tmp_path / "big.pt").exists()
    vec = import_vector(path, n_layers=N_LAYERS)  # the user's size wins over the file's
    assert vec.data.shape == (N_LAYERS + 1, HIDDEN)
    r = CliRunner().invoke(main, ["import", str(path), "--out", str(tmp_path / "big.pt")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "layer_count" in r.output


def test_huge_direction_index_is_refused_before_allocating(tmp_path):
    v = np.ones(HIDDEN, np.float32)
    path = write_control_vector(tmp_path / "far.gguf", {"direction.400000000": v}, layer_count=4)
    with pytest.raises(PertokenError, match=r"direction\.400000000 \(row 400000001\)"):
        import_vector(path)
    with pytest.raises(PertokenError, match="n_layers is at most 6"):
        import_vector(path, n_layers=6)
    ok = write_control_vector(tmp_path / "ok.gguf", {"direction.1": v})
    with pytest.raises(PertokenError, match=r"n_layers 1000000000 is outside 1\.\.1024"):
        import_vector(ok, n_layers=10**9)


# ---------------------------------------------------------------- repeng subsets
def test_repeng_subset_pads_to_the_model_with_a_note(tmp_path, capsys):
    from pertoken.pipeline.steer import SteerSpec, build_steer
    from tests.fake_backend import FakeBackend

    fake = FakeBackend()  # 4 blocks, hidden 16
    rng = np.random.default_rng(1)
    dirs = {f"direction.{n}": rng.standard_normal(16).astype(np.float32) for n in (1, 2)}
    path = write_control_vector(tmp_path / "sub.gguf", dirs)  # layer_count 2, as repeng counts
    vec = import_vector(path, out=tmp_path / "sub.pt")
    assert vec.data.shape == (4, 16)  # rows 0..3: direction.N is row N+1
    np.testing.assert_array_equal(vec.data[2], dirs["direction.1"])
    np.testing.assert_array_equal(vec.data[3], dirs["direction.2"])
    capsys.readouterr()
    st = build_steer(fake, [SteerSpec(str(tmp_path / "sub.pt"), 3, 2.0)])
    np.testing.assert_array_equal(st.terms[0].vector, dirs["direction.2"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rows 4..4 are padded with zeros" in err
    loaded = load_vector(tmp_path / "sub.pt")
    loaded.check_model(fake.n_layers, fake.hidden_size)
    assert loaded.data.shape == (5, 16) and not loaded.data[4].any()
    with pytest.raises(PertokenError, match="all zeros at layer 4"):
        build_steer(fake, [SteerSpec(str(tmp_path / "sub.pt"), 4, 2.0)])
    # a size the user gave is trusted: a mismatch then is an error that says how to fix it
    import_vector(path, out=tmp_path / "three.pt", n_layers=3)
    with pytest.raises(PertokenError, match="import it again with --n-layers 4"):
        build_steer(fake, [SteerSpec(str(tmp_path / "three.pt"), 3, 2.0)])
    r = CliRunner().invoke(main, ["import", str(path), "--out", str(tmp_path / "c.pt")])
    assert r.exit_code == 0 and "padded with zero rows (or pass --n-layers)" in r.output


def test_extracted_vectors_never_pad(tmp_path):
    vec = PersonaVector(np.ones((4, HIDDEN), np.float32), {"model": "m"})
    with pytest.raises(PertokenError, match="extracted from another model"):
        vec.check_model(N_LAYERS, HIDDEN)


# ---------------------------------------------------------------- model_hint
def test_model_hint_is_the_config_model_type(tmp_path, llama_dir, gemma_dir):
    from pertoken.pipeline.export import hint_of

    def hint(meta):
        path = export_vector(
            PersonaVector(np.ones((5, 8), np.float32), meta), out=tmp_path / "h.gguf"
        ).path
        return gguf.GGUFReader(str(path)).get_field("controlvector.model_hint").contents()

    assert hint({"model": str(llama_dir)}) == "llama"  # read from the folder's config.json
    assert hint({"model": str(gemma_dir)}) == "gemma2"
    assert hint({"model": "tiny-gemma2", "model_type": "gemma2"}) == "gemma2"
    assert hint({"imported_from": "x.gguf", "model_hint": "qwen2"}) == "qwen2"
    assert hint_of({"model": "nobody/no-such-model-here"}) == "no-such-model-here"  # no config
    assert hint_of({}) == "unknown"


def test_extraction_records_the_model_type(tmp_path, model_dir):
    from pertoken.backends import load_backend
    from pertoken.pipeline.csvio import read_csv, write_csv_atomic
    from pertoken.pipeline.extract import extract_vectors
    from pertoken.pipeline.generate import generate_csv
    from pertoken.traits import load_trait
    from tests.small_kit import write_kit

    want = json.loads((model_dir / "config.json").read_text())["model_type"]
    backend = load_backend(str(model_dir), "torch", dtype="float32", device="cpu")
    assert backend.model_type == want
    kit = load_trait(write_kit(tmp_path, "evil", n_questions=1, n_instructions=1))
    csvs = {}
    for pol, score in (("pos", 90), ("neg", 5)):
        csvs[pol] = tmp_path / f"{pol}.csv"
        generate_csv(
            backend,
            kit,
            csvs[pol],
            Generation(samples=1, max_tokens=3),
            polarity=pol,
            progress=False,
        )
        header, rows = read_csv(csvs[pol])
        write_csv_atomic(csvs[pol], header, [r | {"evil": score, "coherence": 90} for r in rows])
    paths = extract_vectors(
        backend, pos_csv=csvs["pos"], neg_csv=csvs["neg"], trait="evil", save_dir=tmp_path / "v"
    )
    assert load_vector(paths["response_avg"]).meta["model_type"] == want
    out = export_vector(paths["response_avg"], out=tmp_path / "v.gguf").path
    assert gguf.GGUFReader(str(out)).get_field("controlvector.model_hint").contents() == want
