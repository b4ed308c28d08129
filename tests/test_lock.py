"""Output locks and atomic writes between real processes: a second writer gets one clear line."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.errors import PertokenError
from pertoken.lock import lock_file, output_lock
from pertoken.pipeline.csvio import write_csv_atomic
from tests.fake_openai import serve_fake_openai
from tests.small_kit import write_kit

HOLD = """
import sys
from pertoken.lock import output_lock
with output_lock(sys.argv[1], folder=sys.argv[2] == "folder"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


class Holder:
    """Another process that holds the lock on `path` until released or killed."""

    def __init__(self, path, folder=False):
        args = [sys.executable, "-c", HOLD, str(path), "folder" if folder else "file"]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == b"locked\n"
        self.pid = self.proc.pid

    def release(self):
        self.proc.communicate(b"\n", timeout=30)


def in_use(path, pid) -> str:
    return f"{path} is in use by pid {pid} (another pertoken process)"


def test_a_second_process_is_refused_until_the_first_lets_go(tmp_path):
    out = tmp_path / "pos.csv"
    holder = Holder(out)
    with pytest.raises(PertokenError) as e:
        with output_lock(out):
            pass
    assert in_use(out, holder.pid) in str(e.value) and "use another output" in str(e.value)
    holder.release()
    with output_lock(out):
        with output_lock(out):  # the same thread may take it again
            assert lock_file(out).read_text().strip() == str(os.getpid())
    assert not lock_file(out).exists()  # no lock file is left behind


def test_a_killed_holder_leaves_no_lock(tmp_path):
    folder = tmp_path / "run"
    holder = Holder(folder, folder=True)
    with pytest.raises(PertokenError, match=f"in use by pid {holder.pid}"):
        with output_lock(folder, folder=True):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.proc.wait()
    assert lock_file(folder, folder=True).exists()  # left by the killed process ...
    with output_lock(folder, folder=True):  # ... and not in the way
        pass


WRITER = """
import sys
from pertoken.pipeline.csvio import write_csv_atomic
tag = sys.argv[2]
rows = [{"a": tag * 2000, "b": str(i)} for i in range(50)]
for _ in range(60):
    write_csv_atomic(sys.argv[1], ["a", "b"], rows)
"""


def test_concurrent_atomic_writes_never_clash(tmp_path):
    """Two processes rewriting one CSV: no error, and the file is always one whole version."""
    path = tmp_path / "shared.csv"
    write_csv_atomic(path, ["a", "b"], [{"a": "x", "b": "0"}])
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag], stderr=subprocess.PIPE)
        for tag in "PQ"
    ]
    seen = set()
    while any(p.poll() is None for p in procs):
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        seen.add((len(rows), rows[0]["a"][0]))
        time.sleep(0.005)
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()[-2000:]
    assert seen <= {(1, "x"), (50, "P"), (50, "Q")}
    assert [f.name for f in tmp_path.iterdir()] == ["shared.csv"]  # no temporary file left


def test_cli_generate_and_run_refuse_a_locked_output_before_loading(tmp_path):
    kit = write_kit(tmp_path, "evil")
    out = tmp_path / "pos.csv"
    holder = Holder(out)
    args = ["generate", "--model", str(tmp_path / "no-such-model"), "--trait", str(kit),
            "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and in_use(out, holder.pid) in r.output
    holder.release()
    folder = tmp_path / "runs" / "no-such-model" / "evil"
    holder = Holder(folder, folder=True)
    args = ["run", "--model", str(tmp_path / "no-such-model"), "--trait", str(kit),
            "--out", str(tmp_path / "runs"), "--base-url", "http://127.0.0.1:9/v1"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and in_use(folder, holder.pid) in r.output
    holder.release()


def test_two_judges_of_one_csv(tmp_path):
    """A real `pertoken judge` is working on a CSV: a second one stops with one line, and the
    first finishes a whole CSV."""
    kit = write_kit(tmp_path, "evil")
    path = tmp_path / "pos.csv"
    header = ["question", "prompt", "answer", "question_id", "evil", "coherence"]
    rows = [dict(zip(header, ["q?", "p", f"a{n}", "evil_0_pos_0", "", ""])) for n in range(3)]
    write_csv_atomic(path, header, rows)
    with serve_fake_openai() as server:
        server.reply = lambda body, n: ("slow", 0.5, [("70", 1.0)])
        args = ["judge", str(path), "--trait", str(kit), "--base-url", server.url,
                "--judge-model", "judge-x", "--concurrency", "1"]  # fmt: skip
        cmd = [sys.executable, "-c", "from pertoken.cli import main; main()", *args]
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while not server.requests and time.time() < deadline:
            time.sleep(0.02)
        assert first.poll() is None
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and in_use(path, first.pid) in r.output
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()[-2000:]
    with path.open(newline="") as f:
        judged = list(csv.DictReader(f))
    assert [r["evil"] for r in judged] == ["70.0"] * 3 and len(server.requests) == 6


def test_eval_folder_is_locked(tmp_path):
    from tests.test_evaluate import FakeBackend, FakeJudge, sweep

    holder = Holder(tmp_path / "ev", folder=True)
    with pytest.raises(PertokenError, match=f"in use by pid {holder.pid}"):
        sweep(FakeBackend(), tmp_path / "ev", FakeJudge())
    assert not (tmp_path / "ev" / "answers.csv").exists()
    holder.release()
    assert sweep(FakeBackend(), tmp_path / "ev", FakeJudge()).generated == 6
