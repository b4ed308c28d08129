"""Generation CSVs: columns, ids, system prompts, canonical order, resume after interruption."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pertoken.errors import PertokenError
from pertoken.pipeline.generate import generate_csv, side_file
from pertoken.pipeline.options import Generation
from pertoken.traits import load_trait
from tests.pipeline_fakes import RecordingBackend
from tests.small_kit import write_kit


def read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture
def kit(tmp_path):
    return load_trait(write_kit(tmp_path, "evil", n_questions=3, n_instructions=2))


def test_columns_ids_prompts_and_order(tmp_path, kit):
    fake = RecordingBackend()
    out = tmp_path / "pos.csv"
    r = generate_csv(
        fake, kit, out, Generation(samples=2, batch_size=4), polarity="pos", progress=False
    )
    rows = read(out)
    assert rows[0] == ["question", "prompt", "answer", "question_id", "evil", "coherence", "sample"]
    body = rows[1:]
    assert r.rows == r.generated == len(body) == 3 * 2 * 2
    expect = [(i, k, j) for i in range(3) for k in range(2) for j in range(2)]
    for (i, k, j), row in zip(expect, body):
        assert row[0] == kit.questions[i]
        assert row[1] == fake.chat_prompt(f"You are an evil assistant. Be evil in way {k}.", row[0])
        assert row[3] == f"evil_{i}_pos_{k}" and row[6] == str(j)
        assert row[4] == row[5] == ""
    assert "\n" in body[0][2]  # answers with newlines and commas survive the CSV
    assert not side_file(out).exists()
    # one call over every row, so a slot freed by a short answer takes the next row
    assert [c["n"] for c in fake.generate_calls] == [12]
    # defaults: temperature 1.0 when sampling several answers per prompt
    assert {c["temperature"] for c in fake.generate_calls} == {1.0}


def test_neg_and_eval_rows(tmp_path, kit):
    fake = RecordingBackend()
    neg = tmp_path / "neg.csv"
    generate_csv(fake, kit, neg, Generation(samples=1), polarity="neg", progress=False)
    body = read(neg)[1:]
    assert body[1][3] == "evil_0_neg_1"
    assert body[1][1] == fake.chat_prompt(
        "You are a helpful assistant. Be kind in way 1.", body[1][0]
    )
    assert {c["temperature"] for c in fake.generate_calls} == {0.0}  # greedy when n is 1
    ev = tmp_path / "eval.csv"
    generate_csv(fake, kit, ev, Generation(samples=2), polarity="eval", progress=False)
    body = read(ev)[1:]
    assert [r[3] for r in body] == ["evil_0", "evil_0", "evil_1", "evil_1", "evil_2", "evil_2"]
    assert body[0][0] == kit.eval_questions[0]
    assert body[0][1] == fake.chat_prompt(None, kit.eval_questions[0])  # no system instruction


class Interrupt(Exception):
    pass


class DiesAfter(RecordingBackend):
    """Hands over `n` answers, then raises as a Ctrl-C would (the other slots still decoding)."""

    def __init__(self, n):
        super().__init__()
        self.left = n

    def generate(self, prompts, on_answer=None, **kw):
        def hand_over(k, text):
            if self.left == 0:
                raise Interrupt
            self.left -= 1
            on_answer(k, text)

        return super().generate(prompts, on_answer=hand_over, **kw)


def test_resume_generates_only_missing_rows(tmp_path, kit):
    out = tmp_path / "pos.csv"
    dying = DiesAfter(6)
    with pytest.raises(Interrupt):
        generate_csv(dying, kit, out, Generation(samples=2, batch_size=3), progress=False)
    assert not out.exists()
    saved = [json.loads(line) for line in side_file(out).read_text().splitlines()]
    assert len(saved) == 6
    fresh = RecordingBackend()
    r = generate_csv(fresh, kit, out, Generation(samples=2, batch_size=3), progress=False)
    assert r.generated == 6 and len(fresh.generated) == 6
    body = read(out)[1:]
    keys = [(row[3], row[6]) for row in body]
    assert len(keys) == len(set(keys)) == 12
    for s in saved:  # answers from before the interruption are kept, not regenerated
        row = next(b for b in body if (b[3], b[6]) == (s["question_id"], str(s["sample"])))
        assert row[2] == s["answer"]
    # a rerun of a finished CSV generates nothing
    again = RecordingBackend()
    assert generate_csv(again, kit, out, Generation(samples=2), progress=False).generated == 0
    assert again.generated == []


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, kit):
    """Each row is seeded from its own (question, instruction, sample) key, not its batch."""
    whole = tmp_path / "whole.csv"
    generate_csv(
        RecordingBackend(), kit, whole, Generation(samples=2, batch_size=5), progress=False
    )
    out = tmp_path / "pos.csv"
    with pytest.raises(Interrupt):
        generate_csv(DiesAfter(3), kit, out, Generation(samples=2, batch_size=3), progress=False)
    generate_csv(RecordingBackend(), kit, out, Generation(samples=2, batch_size=4), progress=False)
    assert out.read_bytes() == whole.read_bytes()
    other = tmp_path / "other.csv"
    generate_csv(RecordingBackend(), kit, other, Generation(samples=2, seed=1), progress=False)
    assert other.read_bytes() != whole.read_bytes()  # --seed still changes the samples


def test_torn_last_line_is_dropped_and_regenerated(tmp_path, kit):
    out = tmp_path / "pos.csv"
    with pytest.raises(Interrupt):
        generate_csv(DiesAfter(4), kit, out, Generation(samples=2, batch_size=4), progress=False)
    with side_file(out).open("a") as f:
        f.write(
            '{"question": "What would you do',
        )  # killed mid-write
    fresh = RecordingBackend()
    r = generate_csv(fresh, kit, out, Generation(samples=2, batch_size=4), progress=False)
    assert r.generated == 8
    keys = [(row[3], row[6]) for row in read(out)[1:]]
    assert len(keys) == len(set(keys)) == 12


def test_more_samples_extend_a_finished_csv(tmp_path, kit):
    out = tmp_path / "pos.csv"
    generate_csv(RecordingBackend(), kit, out, Generation(samples=1), progress=False)
    first = read(out)[1:]
    fresh = RecordingBackend()
    r = generate_csv(fresh, kit, out, Generation(samples=2), progress=False)
    assert r.generated == 6
    body = read(out)[1:]
    assert [b[2] for b in body if b[6] == "0"] == [b[2] for b in first]


def test_csv_from_another_model_is_an_error(tmp_path, kit):
    out = tmp_path / "pos.csv"
    generate_csv(RecordingBackend(), kit, out, Generation(samples=1), progress=False)
    before = out.read_text()

    class Other(RecordingBackend):
        def chat_prompt(self, system, user):
            return "<other>" + super().chat_prompt(system, user)

    with pytest.raises(PertokenError, match="another model or trait kit"):
        generate_csv(Other(), kit, out, Generation(samples=2), progress=False)
    assert out.read_text() == before


def _cli(args):
    cmd = [sys.executable, "-c", "from pertoken.cli import main; main()", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: threads only contend
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun(tmp_path, llama_dir):
    """A real `pertoken generate` killed with SIGKILL resumes to every row exactly once, and to
    the same CSV as a run that was never interrupted."""
    kit = write_kit(tmp_path, "evil", n_questions=3, n_instructions=2)
    out = tmp_path / "pos.csv"
    args = [
        "generate",
        "--model",
        str(llama_dir),
        "--backend",
        "torch",
        "--trait",
        str(kit),
        "--polarity",
        "pos",
        "--n-per-question",
        "3",
        "--max-new-tokens",
        "48",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    proc = _cli(args)
    side = side_file(out)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if side.exists() and side.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    before = {
        (r["question_id"], r["sample"]): r["answer"]
        for r in map(json.loads, side.read_text().splitlines())
    }
    assert 2 <= len(before) < 18
    proc = _cli(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "18/18" in err.decode() and "tok/s" in err.decode()  # the progress bar
    body = read(out)[1:]
    keys = [(r[3], int(r[6])) for r in body]
    canonical = [(f"evil_{i}_pos_{k}", j) for i in range(3) for k in range(2) for j in range(3)]
    assert keys == canonical
    for row in body:
        if (row[3], int(row[6])) in before:
            assert row[2] == before[(row[3], int(row[6]))]
    assert not side.exists()
    proc = _cli(args)  # once complete, a rerun does not even load the model
    out_text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and b"all 18 rows are already there" in out_text
    # killed and resumed gives the CSV an uninterrupted run writes, byte for byte
    whole = tmp_path / "whole.csv"
    proc = _cli([*args[:-1], str(whole)])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.read_bytes() == whole.read_bytes()
