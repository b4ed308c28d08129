"""Trace stores and the monitor under steering operators: proj after the intervention,
pre.{vector}.L{row} before it where a term acts, and conditional firing per item."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pertoken.backends import Steer, load_backend
from pertoken.backends.base import Condition
from pertoken.pipeline.monitor import Monitoring, monitor
from pertoken.pipeline.options import Generation
from pertoken.pipeline.trace.dataset import Tracing, trace_dataset
from pertoken.vectors import PersonaVector
from tests.reference import rand

CHATS = [
    [{"role": "user", "content": "should i go"}, {"role": "assistant", "content": "yes go now"}],
    [{"role": "user", "content": "why is the sky so blue today, tell me"},
     {"role": "assistant", "content": "because of the air"}],
]  # fmt: skip


@pytest.fixture(scope="module")
def backend(llama_dir):
    return load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")


def _vectors():
    return {"v": PersonaVector(np.stack([rand(i) for i in range(5)]))}


def _trace(backend, tmp_path, name, steer):
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    out = tmp_path / name
    trace_dataset(
        backend,
        input=src,
        vectors=_vectors(),
        rows=[1, 2],
        out_dir=out,
        tracing=Tracing(steer=steer, page=False, progress=False),
    )
    return (
        pq.read_table(out / "tokens.parquet").to_pandas(),
        pq.read_table(out / "items.parquet").to_pandas(),
        json.loads((out / "trace.json").read_text()),
    )


def test_a_capped_store_holds_proj_after_and_pre_before(backend, tmp_path):
    plain, _, _ = _trace(backend, tmp_path, "plain", None)
    hi = float(plain["proj.v.L2"].median())
    steer = Steer.cap(2, _vectors()["v"].data[2], hi=hi, positions="all")
    tokens, _, settings = _trace(backend, tmp_path, "capped", steer)
    assert "pre.v.L2" in tokens and "pre.v.L1" not in tokens  # nothing acts at row 1
    assert "pre.v.L2" in settings["columns"] and settings["steer"]["terms"][0]["op"] == "cap"
    assert np.array_equal(tokens["pre.v.L2"], plain["proj.v.L2"])
    np.testing.assert_allclose(tokens["proj.v.L2"], np.minimum(plain["proj.v.L2"], hi), atol=1e-4)
    assert (plain["proj.v.L2"] > hi + 0.1).any()


def test_a_conditional_store_records_which_items_fired(backend, tmp_path):
    unit = rand(7) / np.linalg.norm(rand(7))
    ids = [backend.encode(backend.chat_text(m[:1], add_generation_prompt=True)) for m in CHATS]
    means = [
        float(g[:, 0, 0].mean()) for g in backend.token_projections(ids, unit[None, None], [1])
    ]
    cond = Condition(1, rand(7), float(np.mean(means)), name="c")
    steer = Steer.ablate(2, _vectors()["v"].data[2], positions="all", when=cond)
    tokens, items, _ = _trace(backend, tmp_path, "when", steer)
    fired = items.sort_values("item")["fired.ablate.v.L2"].tolist()
    assert fired == [m > cond.threshold for m in means] and any(fired) and not all(fired)
    for i, f in enumerate(fired):
        proj = tokens[tokens["item"] == i]["proj.v.L2"].to_numpy()
        assert (np.abs(proj).max() < 1e-4) == f


def test_monitor_records_pre_projections_and_conditions(backend, tmp_path):
    vec = _vectors()["v"]
    steer = Steer.ablate(2, vec.data[2], positions="response")
    gen, how = Generation(samples=1, max_tokens=5), Monitoring(steer=steer, out_dir=None)
    (rec,) = monitor(backend, ["hello"], {"v": vec}, [2], gen, how)
    after = np.array(rec["projections"])[:, 0, 0]
    assert np.abs(after).max() < 1e-4
    assert len(rec["pre"]["v.L2"]) == len(after) and np.abs(rec["pre"]["v.L2"]).max() > 0.1
    assert rec["settings"]["steer"]["terms"][0]["op"] == "ablate"
