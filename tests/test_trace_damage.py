"""Damaged trace stores and inputs: one line naming the file and the fix, never a traceback,
and a rerun after the fix rebuilds what was removed."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import pertoken.trace
from pertoken import cli
from pertoken.errors import PertokenError
from pertoken.pipeline.trace.dataset import Tracing, trace_dataset
from pertoken.pipeline.trace.diff import trace_diff
from pertoken.pipeline.trace.stats import trace_stats
from pertoken.vectors import PersonaVector
from tests.fake_backend import FakeBackend

CHATS = [
    [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    for i in range(4)
]
VEC = PersonaVector(np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32))


def _trace(inp, out, **kw):
    tracing = Tracing(**dict(page=False, progress=False) | kw)
    return trace_dataset(
        FakeBackend(), input=inp, out_dir=out, vectors={"pat": VEC}, rows=[2, 4], tracing=tracing
    )


@pytest.fixture
def chats(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    return path


@pytest.fixture
def good(chats, tmp_path):
    _trace(chats, tmp_path / "good")
    return tmp_path / "good"


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"garbage" * 50)


@pytest.mark.parametrize("name", ["tokens.parquet", "items.parquet"])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_tables_are_one_line_naming_the_file(good, chats, tmp_path, name, how):
    shutil.copytree(good, tmp_path / "bad")
    bad = tmp_path / "bad"
    _damage(bad / name, how)
    for args in (["trace-stats", str(bad)],
                 ["trace-diff", str(good), str(bad), "--out", str(tmp_path / "d")]):  # fmt: skip
        res = CliRunner().invoke(cli.main, args)
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert f"{bad / name} is damaged" in res.output and "remove" in res.output
        assert len(res.output.strip().splitlines()) == 1
    with pytest.raises(PertokenError, match=f"{name} is damaged"):
        pertoken.trace.load(bad)
    with pytest.raises(PertokenError, match=f"{name} is damaged.*run the `pertoken trace`"):
        _trace(chats, bad)
    (bad / "tokens.parquet").unlink()  # the fix the message gives
    (bad / "items.parquet").unlink()
    assert _trace(chats, bad).traced == 4
    assert pertoken.trace.load(bad)[0].equals(pertoken.trace.load(good)[0])


def test_a_damaged_part_is_named_and_the_rerun_retraces_it(chats, tmp_path):
    out = tmp_path / "out"
    _trace(chats, out, chunk=2)
    (out / "parts").mkdir()
    tokens, _ = pertoken.trace.load(out)
    (out / "tokens.parquet").unlink()  # an interrupted trace: parts only
    part = out / "parts" / "000000000.items.parquet"
    part.write_bytes(b"not parquet")
    (out / "parts" / "000000000.tokens.parquet").write_bytes(b"not parquet")
    with pytest.raises(PertokenError, match=f"{part} is damaged.*remove {part}"):
        _trace(chats, out, chunk=2)


def test_hand_edited_rows_in_trace_json_are_one_line(good, tmp_path):
    settings = json.loads((good / "trace.json").read_text())
    for rows in ([2, 9], "2,4", [2.5]):
        (good / "trace.json").write_text(json.dumps(settings | {"rows": rows}))
        with pytest.raises(PertokenError, match="trace.json (does not match|is damaged)"):
            trace_stats(good, out_dir=tmp_path / "s")
        with pytest.raises(PertokenError, match="trace.json (does not match|is damaged)"):
            trace_diff(good, good, out_dir=tmp_path / "d")
    res = CliRunner().invoke(cli.main, ["trace-stats", str(good)])
    assert res.exit_code == 1 and "Traceback" not in res.output


def test_a_jsonl_with_a_latin1_byte_is_one_line(chats, tmp_path):
    data = chats.read_bytes().replace(b"answer 2", b"caf\xe9 2")
    chats.write_bytes(data)
    with pytest.raises(PertokenError, match=r"chats.jsonl line 3 is not UTF-8.*save the JSONL"):
        _trace(chats, tmp_path / "out")
