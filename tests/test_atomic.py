"""Every kind of output goes through pertoken.atomic: a write that fails, or a process killed
mid-write, leaves the old file byte for byte as it was, and a failed write leaves no temp file."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from pertoken import atomic
from pertoken.pipeline.csvio import write_csv_atomic
from pertoken.pipeline.trace import store
from pertoken.vectors import PersonaVector, load_vector, save_vector


class DiskFull(OSError):
    pass


def _vector(folder, v):
    data = np.full((3, 4), v, np.float32)  # [n_layers + 1, hidden]
    save_vector(PersonaVector(data, {"version": v}), folder / "v.pt")


def _summaries(folder, v):
    from pertoken.pipeline.summaries import SampleSummaries, save_summaries

    states = {"response_avg": np.full((2, 3, 4), v, np.float16)}  # [N, n_layers + 1, hidden]
    ints = np.zeros(2, np.int32)
    save_summaries(
        SampleSummaries(states, np.array([1, 0], np.int8), ints, ints, ints, {"v": v}),
        folder / "t_summaries.npz",
    )


def _part(folder, v):
    table = pa.table({"item": pa.array([1, 1], pa.int64()), "x": pa.array([v, 2.0])})
    store.Parts(folder).write(table, table.slice(0, 1))


def _plot(folder, v):
    from pertoken.pipeline.finetune.plots import loss_plot

    loss_plot([float(v), 1.0, 0.5, 0.25], 2, folder / "loss.png")


def _export(fmt):
    def write(folder, v):
        from pertoken.pipeline.export import write_gguf, write_safetensors

        vec = PersonaVector(np.full((3, 4), v, np.float32), {"version": v})
        if fmt == "gguf":
            write_gguf(vec, [1, 2], folder / "v.gguf", model_hint="llama")
        else:
            write_safetensors(vec, [1, 2], folder / "v.safetensors")

    return write


# kind -> (write(folder, version), the files it writes)
WRITERS = {
    "text": (lambda d, v: atomic.write_text_atomic(d / "a.md", f"v{v}\n"), ["a.md"]),
    "json": (lambda d, v: store.write_json_atomic(d / "trace.json", {"v": v}), ["trace.json"]),
    "csv": (lambda d, v: write_csv_atomic(d / "a.csv", ["a"], [{"a": v}] * 3), ["a.csv"]),
    "vector": (_vector, ["v.pt", "v.json"]),
    "npz": (_summaries, ["t_summaries.npz"]),
    "parquet": (_part, ["parts/000000001.tokens.parquet", "parts/000000001.items.parquet"]),
    "png": (_plot, ["loss.png"]),
    "safetensors": (_export("safetensors"), ["v.safetensors"]),
    "gguf": (_export("gguf"), ["v.gguf"]),
}


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _temps(folder) -> list:
    return [p.name for p in folder.rglob("*.tmp")]


def _fail_at(monkeypatch, n: int):
    """The n-th file to be committed fails after its data is written, before the rename."""
    calls = []

    def fsync(path):
        calls.append(path)
        if len(calls) == n:
            raise DiskFull("simulated: no space left on device")

    monkeypatch.setattr(atomic, "_fsync_file", fsync)


@pytest.mark.parametrize(
    "kind,n", [(k, n) for k, (_, files) in WRITERS.items() for n in range(1, len(files) + 1)]
)
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, kind, n):
    write, files = WRITERS[kind]
    write(tmp_path, 1)
    old = _snapshot(tmp_path)
    assert set(old) == set(files)
    _fail_at(monkeypatch, n)
    with pytest.raises(DiskFull):
        write(tmp_path, 2)
    after = _snapshot(tmp_path)
    failed = files[n - 1]
    assert after[failed] == old[failed]  # the file whose write failed is the old one
    assert _temps(tmp_path) == []
    monkeypatch.undo()
    write(tmp_path, 2)  # and the next write goes through
    assert _snapshot(tmp_path)[failed] != old[failed]


_KILL = """
import os, signal, sys
from pathlib import Path
from pertoken import atomic
from tests.test_atomic import WRITERS
# the process dies with the new data written but not yet renamed into place
atomic._fsync_file = lambda path: os.kill(os.getpid(), signal.SIGKILL)
WRITERS[sys.argv[1]][0](Path(sys.argv[2]), 2)
"""


@pytest.mark.parametrize("kind", ["json", "csv", "vector", "parquet", "png"])
def test_killed_write_keeps_the_old_file(tmp_path, kind):
    write, files = WRITERS[kind]
    write(tmp_path, 1)
    old = _snapshot(tmp_path)
    code = textwrap.dedent(_KILL)
    proc = subprocess.run([sys.executable, "-c", code, kind, str(tmp_path)], cwd=_root())
    assert proc.returncode == -signal.SIGKILL
    after = _snapshot(tmp_path)
    assert {f: after[f] for f in old} == old
    # the killed writer's temp file is hidden and ends in .tmp: no reader picks it up
    assert all(name.startswith(".") for name in _temps(tmp_path))
    if kind == "vector":
        assert load_vector(tmp_path / "v.pt").meta == {"version": 1}


def _root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torch_save_torn_mid_write_keeps_the_old_vector(tmp_path, monkeypatch):
    import torch

    _vector(tmp_path, 1)
    real = torch.save

    def torn(obj, f):
        real(obj, f)
        with open(f, "r+b") as fh:  # half the bytes are out when the disk fills up
            fh.truncate(os.path.getsize(f) // 2)
        raise DiskFull("simulated")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(DiskFull):
        _vector(tmp_path, 2)
    assert load_vector(tmp_path / "v.pt").data[0, 0] == 1.0
    assert json.loads((tmp_path / "v.json").read_text()) == {"version": 1}
    assert _temps(tmp_path) == []


def test_csv_row_failing_mid_file_keeps_the_old_csv(tmp_path):
    class Bad:
        def __str__(self):
            raise ValueError("unprintable")

    path = tmp_path / "a.csv"
    write_csv_atomic(path, ["a"], [{"a": "old"}])
    rows = [{"a": f"new {i}"} for i in range(5000)] + [{"a": Bad()}]
    with pytest.raises(ValueError):
        write_csv_atomic(path, ["a"], rows)
    assert path.read_text() == "a\nold\n"
    assert _temps(tmp_path) == []


def test_token_stream_failing_midway_keeps_the_old_table(tmp_path):
    import pyarrow.parquet as pq

    schema = pa.schema([("item", pa.int64()), ("x", pa.float64())])
    path = tmp_path / store.TOKENS
    with store.RowGroupWriter(path, schema) as w:
        w.add(pa.table({"item": [0], "x": [1.0]}, schema=schema))
    old = path.read_bytes()
    with pytest.raises(RuntimeError), store.RowGroupWriter(path, schema) as w:
        for i in range(3):
            w.add(pa.table({"item": [i], "x": [2.0]}, schema=schema))
            w.flush()  # row groups are on disk in the temp file when it fails
        raise RuntimeError("the second model's tokens differ")
    assert path.read_bytes() == old
    assert pq.read_table(path)["x"].to_pylist() == [1.0]
    assert _temps(tmp_path) == []


def test_failed_page_write_keeps_the_old_page(tmp_path, monkeypatch):
    from pertoken.pipeline.trace.dataset import Tracing, trace_dataset
    from pertoken.pipeline.trace.page import write_store_page
    from tests.fake_backend import FakeBackend

    chats = tmp_path / "chats.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "you must go"}]
    chats.write_text(json.dumps({"messages": msgs}) + "\n")
    vec = PersonaVector(np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32))
    out = tmp_path / "out"
    trace_dataset(FakeBackend(), input=chats, vectors={"pat": vec}, rows=[1], out_dir=out,
                  tracing=Tracing(page=True, progress=False))  # fmt: skip
    old = (out / "trace.html").read_bytes()
    n_files = 1 + len(list((out / "trace_page").iterdir()))  # the data files, then the page
    _fail_at(monkeypatch, n_files)
    with pytest.raises(DiskFull):
        write_store_page(out, title="another title")
    assert (out / "trace.html").read_bytes() == old
    assert _temps(tmp_path) == []


def test_temp_name_is_hidden_unique_and_beside_the_target(tmp_path):
    names = []
    for _ in range(2):
        with atomic.atomic_path(tmp_path / "sub" / "x.pt") as tmp:
            names.append(tmp)
            tmp.write_bytes(b"1")
    assert names[0] != names[1]
    assert all(p.parent == tmp_path / "sub" and p.name.startswith(".x.pt.") for p in names)
    assert all(p.suffix == ".tmp" for p in names)
    assert (tmp_path / "sub" / "x.pt").read_bytes() == b"1"


def test_writer_that_writes_nothing_fails_and_keeps_the_old_file(tmp_path):
    path = atomic.write_bytes_atomic(tmp_path / "x.bin", b"old")
    with pytest.raises(FileNotFoundError), atomic.atomic_path(path):
        pass  # a library that returned without creating its file
    assert path.read_bytes() == b"old"


def test_folder_is_replaced_whole_or_not_at_all(tmp_path):
    ckpt = tmp_path / "checkpoint"
    for step in (1, 2):
        with atomic.atomic_folder(ckpt) as tmp:
            (tmp / "state.json").write_text(json.dumps({"step": step}))
            (tmp / f"weights-{step}").write_bytes(b"w")
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "weights-2"]
    with pytest.raises(DiskFull), atomic.atomic_folder(ckpt) as tmp:
        (tmp / "state.json").write_text(json.dumps({"step": 3}))
        raise DiskFull("simulated: the trainer failed halfway through its checkpoint")
    assert json.loads((ckpt / "state.json").read_text()) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
