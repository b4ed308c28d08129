"""The API judge against a fake OpenAI-compatible server that the real `openai` client calls."""

import csv
import hashlib
import json
import re
import socket
import time
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.errors import PertokenError
from pertoken.pipeline.judge.api import ApiJudge
from pertoken.pipeline.judge.judges import make_judge
from pertoken.pipeline.judge.rubrics import COHERENCE_PROMPT
from pertoken.pipeline.judge.scoring import aggregate_score, number_probs
from pertoken.pipeline.judge.stage import judge_csv
from pertoken.pipeline.options import JudgeSettings
from pertoken.traits import load_trait
from tests.fake_openai import default_reply, serve_fake_openai
from tests.small_kit import kit_dict, write_kit

KEY = "sk-test-SECRET0123456789abcdef"
HEADER = ["question", "prompt", "answer", "question_id", "evil", "coherence"]


@pytest.fixture
def server():
    with serve_fake_openai() as s:
        yield s


@pytest.fixture
def kit(tmp_path):
    return load_trait(write_kit(tmp_path, "evil"))


def write_csv(path, answers):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for n, a in enumerate(answers):
            w.writerow(
                [f"What would you do about problem {n % 2}?", "p", a, f"evil_{n}_pos_0", "", ""]
            )
    return path


def cells(path, col):
    with open(path, newline="") as f:
        return [r[col] for r in csv.DictReader(f)]


def answer_of(body) -> str:
    text = body["messages"][0]["content"]
    m = re.search(r"Answer: (.*)\nReply", text) or re.search(r"START\]\n(.*)\n\[ANSWER END", text)
    return m.group(1)


def api(server, **kw):
    return ApiJudge("judge-x", base_url=server.url, **kw)


def test_score_formula_and_quarter_rule(tmp_path, kit, server):
    dists = {
        "A": [("80", 0.5), ("60", 0.25), ("x", 0.25)],
        "B": [("REFUSAL", 0.8), ("50", 0.2)],  # 0.2 < 0.25 on numbers: missing
        "C": [("REF", 0.74), ("30", 0.26)],
        "D": [("101", 0.5), ("100", 0.3), (" 7", 0.2)],
    }
    server.reply = lambda body, n: (
        dists[answer_of(body)]
        if "evil" in str(body) and "coherent" not in body["messages"][0]["content"]
        else default_reply(body, n)
    )
    path = write_csv(tmp_path / "pos.csv", list(dists))
    r = judge_csv(
        path,
        make_judge(
            kit,
            JudgeSettings(judge_model="judge-x", cache=tmp_path / "c.sqlite"),
            scorer=api(server),
            progress=False,
        ),
    )
    got = [float(x) if x else None for x in cells(path, "evil")]
    assert got[0] == pytest.approx((80 * 0.5 + 60 * 0.25) / 0.75, rel=1e-6)
    assert got[1] is None
    assert got[2] == pytest.approx(30.0, rel=1e-6)
    assert got[3] == pytest.approx((100 * 0.3 + 7 * 0.2) / 0.5, rel=1e-6)
    assert [float(x) for x in cells(path, "coherence")] == pytest.approx([89.0] * 4)
    assert r.refused == {"evil": 1, "coherence": 0} and r.failed == {"evil": 0, "coherence": 0}
    assert r.requests == 8 and r.missing == 1
    body = server.requests[0]
    assert body["model"] == "judge-x" and body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["seed"] == 0
    assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
    contents = {b["messages"][0]["content"] for b in server.requests}
    assert kit.rubric("What would you do about problem 0?", "A") in contents
    assert (
        COHERENCE_PROMPT.replace("{question}", "What would you do about problem 0?").replace(
            "{answer}", "A"
        )
        in contents
    )


def test_number_tokens_and_aggregate():
    probs = number_probs(
        [
            ("50", np.log(0.5)),
            ("05", np.log(0.1)),
            ("-3", np.log(0.2)),
            ("1e2", np.log(0.1)),
            ("50", np.log(0.1)),
        ]
    )
    assert probs == pytest.approx({50: 0.6, 5: 0.1})
    assert aggregate_score({}) is None
    assert aggregate_score({10: 0.25}) == 10.0 and aggregate_score({10: 0.2499}) is None


def test_retries_on_429_500_and_timeouts(tmp_path, kit, server):
    tries = Counter()

    def reply(body, n):
        a = answer_of(body)
        tries[a, "coherent" in body["messages"][0]["content"]] += 1
        t = tries[a, "coherent" in body["messages"][0]["content"]]
        if a == "rate" and t <= 2:
            return 429
        if a == "broken" and t <= 2:
            return 500 if t == 1 else 503
        if a == "slow" and t == 1:
            return ("slow", 3.0, [("10", 1.0)])
        return [("70", 1.0)]

    server.reply = reply
    path = write_csv(tmp_path / "pos.csv", ["rate", "broken", "slow"])
    r = judge_csv(
        path,
        make_judge(
            kit,
            JudgeSettings(judge_model="judge-x", cache=tmp_path / "c.sqlite"),
            scorer=api(server, timeout=0.5),
            progress=False,
        ),
    )
    assert cells(path, "evil") == ["70.0"] * 3 and r.missing == 0
    assert tries["rate", False] == tries["broken", False] == 3 and tries["slow", False] == 2


def test_failure_after_retries_is_missing_not_zero_and_retried_later(tmp_path, kit, server):
    server.reply = lambda body, n: 500 if answer_of(body) == "bad" else [("60", 1.0)]
    path = write_csv(tmp_path / "pos.csv", ["good", "bad"])
    cache = tmp_path / "c.sqlite"
    r = judge_csv(
        path,
        make_judge(
            kit,
            JudgeSettings(judge_model="judge-x", cache=cache),
            scorer=api(server, max_retries=1),
            progress=False,
        ),
    )
    assert cells(path, "evil") == ["60.0", ""] and cells(path, "coherence") == ["60.0", ""]
    assert r.failed == {"evil": 1, "coherence": 1} and r.refused == {"evil": 0, "coherence": 0}
    n = len(server.requests)
    server.reply = lambda body, n: [("40", 1.0)]
    r = judge_csv(
        path,
        make_judge(
            kit,
            JudgeSettings(judge_model="judge-x", cache=cache),
            scorer=api(server),
            progress=False,
        ),
    )
    assert len(server.requests) == n + 2 and r.missing == 0  # only the failed calls again
    assert cells(path, "evil") == ["60.0", "40.0"]


def test_every_call_failing_is_an_error(tmp_path, kit, server):
    server.reply = lambda body, n: 500
    path = write_csv(tmp_path / "pos.csv", ["a"])
    with pytest.raises(PertokenError, match="every judge call failed"):
        judge_csv(
            path,
            make_judge(
                kit,
                JudgeSettings(judge_model="judge-x", cache=tmp_path / "c.sqlite"),
                scorer=api(server, max_retries=0),
                progress=False,
            ),
        )


def test_bounded_concurrency(tmp_path, kit, server):
    server.reply = lambda body, n: ("slow", 0.15, [("50", 1.0)])
    path = write_csv(tmp_path / "pos.csv", [f"a{n}" for n in range(8)])
    judge_csv(
        path,
        make_judge(
            kit,
            JudgeSettings(judge_model="judge-x", cache=tmp_path / "c.sqlite"),
            scorer=api(server, concurrency=3),
            progress=False,
        ),
    )
    assert len(server.requests) == 16
    assert 2 <= server.max_inflight <= 3


def test_cache_makes_a_rerun_free(tmp_path, kit, server):
    path = write_csv(tmp_path / "pos.csv", ["a", "b", "a"])
    cache = tmp_path / "c.sqlite"
    r1 = judge_csv(
        path,
        make_judge(
            kit,
            JudgeSettings(judge_model="judge-x", cache=cache),
            scorer=api(server),
            progress=False,
        ),
    )
    assert r1.requests == 4  # the repeated answer is judged once
    first = path.read_text()
    r2 = judge_csv(
        path,
        make_judge(
            kit,
            JudgeSettings(judge_model="judge-x", cache=cache),
            scorer=api(server),
            progress=False,
        ),
    )
    assert r2.requests == 0 and r2.cached == 4 and len(server.requests) == 4
    assert path.read_text() == first
    # another judge model is another cache entry
    judge_csv(
        path,
        make_judge(
            kit,
            JudgeSettings(judge_model="judge-y", cache=cache, base_url=server.url),
            progress=False,
        ),
    )
    assert len(server.requests) == 8


def test_cli_judge_key_never_written(tmp_path, kit, server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    path = write_csv(tmp_path / "pos.csv", ["a", "b"])
    args = [
        "judge",
        str(path),
        "--trait",
        kit.source,
        "--base-url",
        server.url,
        "--judge-model",
        "judge-x",
        "--cache",
        str(tmp_path / "c.sqlite"),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"
    server.reply = lambda body, n: 401
    (tmp_path / "c.sqlite").unlink()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "rejected the API key" in r.output and "OPENAI_API_KEY" in r.output
    assert KEY not in r.output and "SECRET" not in r.output
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"SECRET" not in f.read_bytes(), f


def test_missing_key_names_key_and_offline_options(tmp_path, kit, monkeypatch, server):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    path = write_csv(tmp_path / "pos.csv", ["a"])
    r = CliRunner().invoke(
        main, ["judge", str(path), "--trait", kit.source, "--cache", str(tmp_path / "c.sqlite")]
    )
    assert r.exit_code == 1
    assert "OPENAI_API_KEY" in r.output and "--base-url" in r.output and "local:MODEL" in r.output
    # a .env file in the working folder supplies the key
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={KEY}\n")
    r = CliRunner().invoke(
        main,
        [
            "judge",
            str(path),
            "--trait",
            kit.source,
            "--base-url",
            server.url,
            "--cache",
            str(tmp_path / "c.sqlite"),
        ],
    )
    assert r.exit_code == 0 and server.headers[0]["authorization"] == f"Bearer {KEY}"
    # with every score of this server cached, no key and no request are needed
    (tmp_path / ".env").unlink()
    monkeypatch.delenv("OPENAI_API_KEY")
    n = len(server.requests)
    r = CliRunner().invoke(
        main,
        ["judge", str(path), "--trait", kit.source, "--base-url", server.url,
         "--cache", str(tmp_path / "c.sqlite")],
    )  # fmt: skip
    assert r.exit_code == 0 and "(0 calls, 2 cached" in r.output and len(server.requests) == n


def test_csv_of_another_trait_is_an_error(tmp_path, server):
    other = load_trait(write_kit(tmp_path, "kind"))
    path = write_csv(tmp_path / "pos.csv", ["a"])
    with pytest.raises(PertokenError, match="another trait"):
        judge_csv(
            path, make_judge(other, JudgeSettings(base_url=server.url, cache=tmp_path / "c.sqlite"))
        )


def test_api_judge_inside_a_running_event_loop(tmp_path, kit, server):
    """Notebooks run an event loop: the judge still works from inside one."""
    import asyncio

    path = write_csv(tmp_path / "pos.csv", ["a"])

    async def inside():
        return judge_csv(
            path,
            make_judge(
                kit,
                JudgeSettings(judge_model="judge-x", cache=tmp_path / "c.sqlite"),
                scorer=api(server),
                progress=False,
            ),
        )

    assert asyncio.run(inside()).requests == 2
    assert cells(path, "evil") != [""]


def judge_with(server, path, tmp_path, trait=None, **kw):
    trait = trait or load_trait(write_kit(tmp_path, "evil"))
    settings = JudgeSettings("judge-x", cache=tmp_path / "c.sqlite")
    opts = dict(scorer=api(server), progress=False)
    return judge_csv(path, make_judge(trait, settings, **opts | kw))


@pytest.mark.parametrize(
    "broken",
    [
        ("top_logprobs", []),
        ("top_logprobs", [("50", float("nan")), ("40", -1.0)]),
        ("top_logprobs", None),
    ],
    ids=["empty", "nan", "null"],
)
def test_malformed_logprobs_are_failures_not_cached_refusals(tmp_path, server, broken):
    """A broken answer is counted as failed and asked again on rerun; NaN never reaches the CSV."""
    server.reply = lambda body, n: broken if answer_of(body) == "bad" else [("60", 1.0)]
    path = write_csv(tmp_path / "pos.csv", ["good", "bad"])
    r = judge_with(server, path, tmp_path)
    assert r.failed == {"evil": 1, "coherence": 1} and r.refused == {"evil": 0, "coherence": 0}
    assert cells(path, "evil") == ["60.0", ""] and "nan" not in path.read_text().lower()
    n = len(server.requests)
    server.reply = lambda body, n: [("30", 1.0)]  # the server is healthy again
    r = judge_with(server, path, tmp_path)
    assert len(server.requests) == n + 2 and r.missing == 0
    assert cells(path, "evil") == ["60.0", "30.0"]


def test_a_real_refusal_is_cached(tmp_path, server):
    server.reply = lambda body, n: [("REFUSAL", 0.9), ("10", 0.1)]
    path = write_csv(tmp_path / "pos.csv", ["a"])
    r = judge_with(server, path, tmp_path)
    assert r.refused == {"evil": 1, "coherence": 1} and r.failed == {"evil": 0, "coherence": 0}
    n = len(server.requests)
    assert judge_with(server, path, tmp_path).requests == 0 and len(server.requests) == n


@pytest.mark.parametrize(
    "reply",
    [
        ("raw", "text/html", b"<html><body>Welcome to the proxy</body></html>"),
        ("raw", "application/json", b'{"choices": [{"index": 0, '),
        ("top_logprobs", None),
    ],
    ids=["html", "malformed-json", "null-top-logprobs"],
)
def test_broken_server_is_one_clear_line(tmp_path, kit, server, reply):
    server.reply = lambda body, n: reply
    path = write_csv(tmp_path / "pos.csv", ["a", "b"])
    args = ["judge", str(path), "--trait", kit.source, "--base-url", server.url,
            "--judge-model", "judge-x", "--cache", str(tmp_path / "c.sqlite")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = error_lines(r.output)
    assert line.startswith("error: every judge call failed; the first: the answer")
    assert "not a chat completion" in line or "top_logprobs" in line


def error_lines(output: str) -> list[str]:
    """Lines of CLI output other than the progress bar's."""
    return [x for x in output.replace("\r", "\n").splitlines() if x and "call/s" not in x]


def test_password_in_base_url_is_never_shown_or_written(tmp_path, kit, server):
    url = server.url.replace("http://", "http://alice:PASSWORD@")
    path = write_csv(tmp_path / "pos.csv", ["a"])
    args = ["judge", str(path), "--trait", kit.source, "--base-url", url,
            "--judge-model", "judge-x", "--cache", str(tmp_path / "c.sqlite")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "pos.csv.judge.json").read_text())
    assert side["judge_base_url"] == server.url and "PASSWORD" not in str(side)
    server.reply = lambda body, n: ("raw", "text/html", b"<html>down</html>")
    (tmp_path / "c.sqlite").unlink()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "127.0.0.1" in r.output and "PASSWORD" not in r.output
    port = server.url.split(":")[2].split("/")[0]
    closed = url.replace(port, str(free_port()))
    r = CliRunner().invoke(
        main, [*args[:4], "--base-url", closed, *args[6:], "--max-consecutive-failures", "2"]
    )
    assert r.exit_code == 1 and "could not be reached" in r.output
    assert "PASSWORD" not in r.output and "alice" not in r.output
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"PASSWORD" not in f.read_bytes(), f


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cache_key_includes_the_server(tmp_path, server):
    """Scores of one server are never reused as another's for the same model name."""
    path = write_csv(tmp_path / "pos.csv", ["a"])
    judge_with(server, path, tmp_path)
    assert len(server.requests) == 2
    with serve_fake_openai() as other:
        other.reply = lambda body, n: [("10", 1.0)]
        r = judge_with(other, path, tmp_path, scorer=api(other))
        assert r.requests == 2 and len(other.requests) == 2
        assert cells(path, "evil") == ["10.0"]
    assert judge_with(server, path, tmp_path).requests == 0  # the first server's are cached


def test_sidecar_records_server_and_rubric_digests(tmp_path, server):
    path = write_csv(tmp_path / "pos.csv", ["a"])
    kit = load_trait(write_kit(tmp_path, "evil"))
    judge_with(server, path, tmp_path, trait=kit)
    side = json.loads((tmp_path / "pos.csv.judge.json").read_text())
    assert side["judge_model"] == "judge-x" and side["judge_base_url"] == server.url
    digest = {
        "evil": hashlib.sha256(kit.eval_prompt.encode()).hexdigest(),
        "coherence": hashlib.sha256(COHERENCE_PROMPT.encode()).hexdigest(),
    }
    assert side["rubric_sha256"] == digest


def test_coherence_rubric_from_the_kit_or_a_file(tmp_path, server):
    """The kit's coherence_prompt, then --coherence-prompt FILE, replace pertoken's rubric;
    each is its own cache entry and its digest is in the sidecar."""
    data = kit_dict("evil")
    data["coherence_prompt"] = "KIT RUBRIC: is this coherent?\n{question}\n{answer}"
    kit_path = tmp_path / "evil.json"
    kit_path.write_text(json.dumps(data))
    path = write_csv(tmp_path / "pos.csv", ["a"])
    judge_with(server, path, tmp_path, trait=load_trait(kit_path))
    assert server.count("KIT RUBRIC") == 1 and server.count("I am evaluating") == 0
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("FILE RUBRIC: coherent? {question} {answer}")
    args = ["judge", str(path), "--trait", str(kit_path), "--base-url", server.url,
            "--judge-model", "judge-x", "--cache", str(tmp_path / "c.sqlite"),
            "--coherence-prompt", str(rubric)]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "(1 calls, 1 cached" in r.output  # the trait score is cached, coherence is new
    assert server.count("FILE RUBRIC") == 1
    side = json.loads((tmp_path / "pos.csv.judge.json").read_text())
    assert side["rubric_sha256"]["coherence"] == hashlib.sha256(rubric.read_bytes()).hexdigest()
    rubric.write_text("no slots here")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "lacks the slot {question} and {answer}" in r.output


def test_consecutive_timeouts_stop_the_run(tmp_path, server):
    """A hanging server stops the run once N retries in a row time out, not after hours."""
    server.reply = lambda body, n: ("slow", 3.0, [("50", 1.0)])
    path = write_csv(tmp_path / "pos.csv", [f"a{n}" for n in range(6)])
    judge = api(server, timeout=0.2, max_retries=6, concurrency=2, max_consecutive_failures=2)
    start = time.perf_counter()
    match = r"timed out \(0.2s each\) on 2 retried requests in a row"
    with pytest.raises(PertokenError, match=match):
        judge_with(server, path, tmp_path, scorer=judge)
    assert time.perf_counter() - start < 3.0 and len(server.requests) == 4  # 2 tries of 2 calls


def test_failures_between_answers_do_not_add_up(tmp_path, server):
    """Only failed retries in a row count: a server that answers now and then keeps the run
    going, and a first try's failure (a dropped connection under load) does not count."""
    seen = Counter()

    def reply(body, n):
        seen[body["messages"][0]["content"]] += 1
        slow = seen[body["messages"][0]["content"]] <= 2  # the first two tries of each time out
        return ("slow", 1.0, [("50", 1.0)]) if slow else [("50", 1.0)]

    server.reply = reply
    path = write_csv(tmp_path / "pos.csv", ["a"])
    judge = api(server, timeout=0.2, concurrency=1, max_consecutive_failures=2)
    r = judge_with(server, path, tmp_path, scorer=judge)  # two calls, each: fail, fail, answer
    assert r.missing == 0 and cells(path, "evil") == ["50.0"] and len(server.requests) == 6


def test_cli_stops_on_consecutive_connection_failures(tmp_path, kit):
    path = write_csv(tmp_path / "pos.csv", [f"a{n}" for n in range(10)])
    args = ["judge", str(path), "--trait", kit.source, "--judge-model", "judge-x",
            "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--max-consecutive-failures",
            "2", "--cache", str(tmp_path / "c.sqlite")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = error_lines(r.output)
    assert "could not be reached on 2 retried requests in a row" in line


def test_progress_bar_shows_failures_and_retries_as_they_happen(tmp_path, server, capsys):
    server.reply = lambda body, n: 500 if answer_of(body) == "bad" else [("60", 1.0)]
    path = write_csv(tmp_path / "pos.csv", ["good", "bad"])
    judge_with(server, path, tmp_path, scorer=api(server, max_retries=1), progress=True)
    err = capsys.readouterr().err
    assert "2 failed" in err and "500 retried" in err
