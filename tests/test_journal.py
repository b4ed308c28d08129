"""The one resumable journal (generate's side file, trace's answers.jsonl): whole records come
back after a kill, a torn last line is cut off, and the next record starts on a line of its own."""

import json
import signal
import subprocess
import sys
import time

import pytest

from pertoken.journal import Journal
from pertoken.pipeline.trace.dataset import Generation
from tests.test_trace import Answering, _trace


def test_records_come_back_in_order_and_a_missing_file_is_empty(tmp_path):
    j = Journal(tmp_path / "sub" / "j.jsonl")
    assert j.read() == []
    j.append([{"i": 0, "text": "é\u2028x"}, {"i": 1}])
    j.append([{"i": 2}])
    assert j.read() == [{"i": 0, "text": "é\u2028x"}, {"i": 1}, {"i": 2}]


def test_torn_last_line_is_cut_off_and_the_next_record_is_whole(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.append([{"i": 0}, {"i": 1}])
    with j.path.open("a") as f:
        f.write('[1, 2]\n"not a record"\n{"i": 2, "text": "kil')  # killed mid-write
    assert j.read() == [{"i": 0}, {"i": 1}]
    assert j.path.read_text().endswith('"not a record"\n')  # the torn line is gone
    j.append([{"i": 2}])
    assert j.read() == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_damaged_line_in_the_middle_is_skipped(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.path.write_bytes(b'{"i": 0}\n{"i": \xff\n{"i": 2}\n')
    assert j.read() == [{"i": 0}, {"i": 2}]


_APPEND_FOREVER = """
import sys
from pertoken.journal import Journal
j = Journal(sys.argv[1])
for i in range(10**9):
    j.append([{"i": i, "text": "x" * (i % 5000)}])
"""


def test_process_killed_while_appending_leaves_only_whole_records(tmp_path):
    path = tmp_path / "j.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _APPEND_FOREVER, str(path)])
    deadline = time.monotonic() + 60
    while (not path.exists() or path.stat().st_size < 200_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    records = Journal(path).read()
    assert len(records) > 10
    assert [r["i"] for r in records] == list(range(len(records)))
    assert all(r["text"] == "x" * (r["i"] % 5000) for r in records)
    assert path.read_bytes().endswith(b"\n")


def test_trace_answers_resume_past_a_torn_line(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first question\nsecond question\nthird\n")
    dying = Answering(live=2)
    with pytest.raises(KeyboardInterrupt):
        _trace(dying, prompts, tmp_path / "out", generation=Generation(seed=5))
    answers = tmp_path / "out" / "answers.jsonl"
    with answers.open("a") as f:
        f.write(json.dumps({"item": 2, "input_sha256": "x", "answer": "sure"})[:25])
    rest = Answering()
    _trace(rest, prompts, tmp_path / "out", generation=Generation(seed=5))
    assert rest.generated == [rest.chat_prompt(None, "third")]  # the torn one is generated again
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [row["item"] for row in lines] == [0, 1, 2]
