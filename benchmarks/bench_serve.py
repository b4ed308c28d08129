"""`pertoken serve` under arriving requests against other OpenAI-compatible servers, in one run.

    python benchmarks/bench_serve.py                                  # random Llama, torch
    python benchmarks/bench_serve.py --model DIR --backend mlx        # a real chat model
    python benchmarks/bench_serve.py --before a4b16a2                 # + the server of a commit

Contenders, each a server subprocess started once and kept up, all on the same model and the
same prompts (a shared system prompt, then a question of its own): `pertoken` (this tree: the
running slot loop with its prefix cache), `pertoken@REV` (the package as it was at commit REV,
for the batch-window server before the slot loop), `mlx_lm.server` (--backend mlx) and
`transformers serve --continuous-batching` (--backend torch) where they start here.

Workloads: 1 client and 16 clients each sending --requests streamed requests one after another,
and --poisson requests arriving at --rate per second (Poisson arrivals, open loop). For each,
contenders interleaved rep by rep: aggregate completion tokens/s (first send to last token) and
time to first token p50/p95, and the answers' lengths (p10/p50/p90 completion tokens). Greedy,
at most --new-tokens each; torch servers pinned to --threads.

With the default 32 new tokens almost every answer reaches the cap, so all are the same length
and a batch that waits for its longest answer wastes nothing. Real chat answers end at their
own stop token at very different lengths: `--new-tokens 192` lets a chat model's answers end
there (the table's length column shows the spread); `--spread` draws each request's max_tokens
between --new-tokens / 8 and --new-tokens instead (for the random Llama, which rarely stops).
Servers whose greedy answers differ (batched float arithmetic parts near ties) do different
work; `--ban-stop` sends logit_bias -100 on the stop tokens so every answer runs to its cap.

`--count` counts each server's forwards (counting/forward_counter.py) and adds the
model forward passes and rows (batch x positions) each server ran per rep: the work it did,
which on a CPU sets its time and on a GPU its passes do.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

SYSTEM = (
    "You are a helpful assistant. Answer the question in a few plain sentences, without lists, "
    "and say so when you do not know. Keep a friendly and calm tone throughout the answer."
)
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def random_chat_llama(hidden: int, layers: int, folder: Path, vocab: int = 1024) -> Path:
    """A random Llama-3-style checkpoint whose words `t{i}` are token i, with a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    heads = max(4, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False,
        eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), pad_token="t0", eos_token="t1"
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return folder


def questions(n: int, random_words: bool, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    if random_words:
        return [" ".join(f"t{i}" for i in rng.integers(2, 1000, 16)) for _ in range(n)]
    topics = ["rain", "bread", "magnets", "tides", "bees", "volcanoes", "clocks", "glass",
              "maps", "salt", "ice", "sleep", "rivers", "coffee", "stars", "paper"]  # fmt: skip
    asks = ["How does {} work?", "Why do people care about {}?", "What is a surprising fact "
            "about {}?", "Explain {} to a child."]  # fmt: skip
    return [
        asks[rng.integers(len(asks))].format(topics[rng.integers(len(topics))]) for _ in range(n)
    ]


# ---------------------------------------------------------------------- servers
@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    url: str = ""
    model: str = ""  # the name its API answers to
    extra: dict = field(default_factory=dict)  # added to every request's body
    counts: str = ""  # forward_counter.py's file, where its forwards are counted

    def work(self) -> tuple[int, int] | None:
        """(forward passes, rows) run so far, when counted."""
        if not self.counts:
            return None
        got = json.loads(Path(self.counts).read_text())
        return got["passes"], got["rows"]

    def start(self, timeout: float = 600) -> bool:
        port = _free_port()
        cmd = [c.replace("{port}", str(port)) for c in self.cmd]
        log = open(Path(tempfile.gettempdir()) / f"bench_serve_{port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=os.environ | self.env)
        self.url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if self.model:  # named up front: any answer means it is up
                    httpx.get(self.url + "/health", timeout=5)
                    return True
                data = httpx.get(self.url + "/v1/models", timeout=5).json()["data"]
                self.model = data[0]["id"] if data else ""
                return True
            except (httpx.TransportError, ValueError, KeyError):
                if self.proc.poll() is not None:
                    print(f"  ({self.name} did not start: see {log.name})")
                    return False
                time.sleep(1)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def before_tree(rev: str) -> Path:
    """The package as it was at commit `rev`, unpacked into a folder to put on PYTHONPATH."""
    here = Path(__file__).resolve().parent.parent
    out = Path(tempfile.mkdtemp()) / "src"
    (out / "pertoken").mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(here), "archive", rev], capture_output=True,
                             check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(out / "pertoken")], input=archive, check=True)
    return out


def servers(args, model: str) -> list[Server]:
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    here = str(Path(__file__).resolve().parent.parent.parent)
    pertoken = [sys.executable, "-c", "from pertoken.cli import main; main()", "serve",
                "--model", model, "--backend", args.backend, "--port", "{port}",
                "--max-batch", "32", "--max-tokens", str(args.new_tokens)]  # fmt: skip
    out = [Server("pertoken", pertoken, threads | {"PYTHONPATH": here})]
    if args.before:
        src = before_tree(args.before)
        serve = (src / "pertoken" / "commands" / "serve.py").read_text()
        window = ["--batch-window", "20"] if "--batch-window" in serve else []  # its server
        out.append(Server(f"pertoken@{args.before}", pertoken + window,
                          threads | {"PYTHONPATH": str(src)}))  # fmt: skip
    if args.backend == "mlx" and not args.no_others:
        cmd = [sys.executable, "-m", "mlx_lm.server", "--model", model, "--port", "{port}"]
        out.append(Server("mlx_lm.server", cmd, {}, model=model))
    if args.backend == "torch" and not args.no_others:
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", "--port", "{port}",
               "--continuous-batching", "--dtype", "float32", model]  # fmt: skip
        out.append(Server("transformers serve --continuous-batching", cmd, threads, model=model))
    return [counted(s, args.backend) for s in out] if args.count else out


def counted(server: Server, backend: str) -> Server:
    """The server with its model's forwards counted (counting/forward_counter.py)."""
    fd, server.counts = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    Path(server.counts).write_text('{"passes": 0, "rows": 0}')
    counting = str(Path(__file__).resolve().parent / "counting")
    paths = [counting, server.env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))]
    server.env = server.env | {"PYTHONPATH": os.pathsep.join(p for p in paths if p),
                               "COUNT_FORWARDS": server.counts, "COUNT_KIND": backend}  # fmt: skip
    return server


def stop_ids(model: str) -> list[int]:
    """The tokens that end a chat answer: the tokenizer's end token and generation_config's."""
    from transformers import AutoTokenizer, GenerationConfig

    ids = {AutoTokenizer.from_pretrained(model).eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos])
    except OSError:  # no generation_config.json
        pass
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------- load
@dataclass
class Result:
    seconds: float
    got: list[tuple[int, float | None]]  # per request: (completion tokens, its TTFT)
    work: tuple[int, int] | None = None  # forward passes and rows the server ran for it

    @property
    def tokens(self) -> int:
        return sum(n for n, _ in self.got)

    @property
    def ttft(self) -> list[float]:
        return [f for _, f in self.got if f]


def caps(n: int, new: int, spread: bool, seed: int) -> list[int]:
    """Each request's max_tokens: `new`, or with `spread` drawn between new // 8 and new."""
    if not spread:
        return [new] * n
    return np.random.default_rng(seed).integers(max(1, new // 8), new + 1, n).tolist()


def one(http: httpx.Client, server: Server, q: str, new: int) -> tuple[int, float | None]:
    """A streamed request: (completion tokens, seconds to its first content)."""
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
    body = {"model": server.model, "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "messages": chat} | server.extra  # fmt: skip
    t0, first, chunks, used = time.perf_counter(), None, 0, None
    with http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                used = event["usage"].get("completion_tokens")
            for c in event.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    first = first or time.perf_counter() - t0
                    chunks += 1
    return (used if used is not None else chunks), first


def clients(server: Server, qs: list[list[tuple[str, int]]]) -> Result:
    """len(qs) clients, each sending its (question, max_tokens) one after another."""
    got: list[tuple[int, float | None]] = []
    start = threading.Barrier(len(qs) + 1)

    def run(mine: list[tuple[str, int]]) -> None:
        with httpx.Client(timeout=900) as http:
            start.wait()
            for q, new in mine:
                got.append(one(http, server, q, new))

    threads = [threading.Thread(target=run, args=(m,)) for m in qs]
    [t.start() for t in threads]
    start.wait()
    t0 = time.perf_counter()
    [t.join() for t in threads]
    return Result(time.perf_counter() - t0, got)


def poisson(server: Server, qs: list[tuple[str, int]], rate: float, seed: int) -> Result:
    """Requests sent at Poisson arrival times (rate per second), each on its own connection."""
    gaps = np.random.default_rng(seed).exponential(1 / rate, len(qs))
    got: list[tuple[int, float | None]] = []

    def run(q: str, new: int) -> None:
        with httpx.Client(timeout=900) as http:
            got.append(one(http, server, q, new))

    t0, threads = time.perf_counter(), []
    for (q, new), gap in zip(qs, gaps):
        time.sleep(gap)
        threads.append(threading.Thread(target=run, args=(q, new)))
        threads[-1].start()
    [t.join() for t in threads]
    return Result(time.perf_counter() - t0, got)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a chat model folder")
    ap.add_argument("--random", default="256x4", help="random Llama HIDDENxLAYERS (no --model)")
    ap.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--before", default=None, help="also serve the package of this commit")
    ap.add_argument("--no-others", action="store_true", help="only pertoken servers")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--poisson", type=int, default=24, help="requests of the Poisson workload")
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    ap.add_argument("--new-tokens", type=int, default=32, help="each answer's max_tokens")
    ap.add_argument(
        "--spread",
        action="store_true",
        help="each request's max_tokens drawn in [new-tokens / 8, new-tokens]",
    )
    ap.add_argument(
        "--ban-stop",
        action="store_true",
        help="every server gets logit_bias -100 on the model's stop tokens: all answers run to "
        "their max_tokens, so each server does the same work",
    )
    ap.add_argument("--loads", default="1,16,poisson", help="which loads to run, in order")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--count", action="store_true", help="count each server's forwards")
    args = ap.parse_args()
    model = args.model or str(
        random_chat_llama(*map(int, args.random.split("x")), Path(tempfile.mkdtemp()) / "m")
    )
    every, up = servers(args, model), []
    if args.ban_stop:
        bias = {str(t): -100 for t in stop_ids(model)}
        for s in every:
            s.extra = {"logit_bias": bias}
    words, new, spread = args.model is None, args.new_tokens, args.spread

    def asked(n: int, seed: int) -> list[tuple[str, int]]:
        return list(zip(questions(n, words, seed), caps(n, new, spread, seed)))

    loads = {
        "1": ("1 client", lambda s, r: clients(s, [asked(args.requests, r)])),
        "16": ("16 clients", lambda s, r: clients(
            s, [asked(args.requests, 100 * r + c) for c in range(16)]
        )),
        "poisson": (f"Poisson {args.rate}/s", lambda s, r: poisson(
            s, asked(args.poisson, 7 + r), args.rate, r
        )),
    }  # fmt: skip
    cap = f"max_tokens drawn in [{max(1, new // 8)}, {new}]" if spread else f"{new} new tokens"
    cap += ", stop tokens banned" if args.ban_stop else ""
    print(f"{Path(model).name} ({args.backend}), {cap}, greedy, streamed, median of "
          f"{args.reps}; torch servers at {args.threads} thread(s); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    work = " passes/rows per rep |" if args.count else ""
    print("| load | server | tok/s | ratio | TTFT p50 ms | TTFT p95 ms | answer tokens "
          f"p10/p50/p90 |{work}\n" + "| --- " * (7 + args.count) + "|")  # fmt: skip
    try:
        up = [s for s in every if s.start()]
        for s in up:  # a warm-up each (first requests load kernels, build caches)
            clients(s, [[(questions(1, words, 999)[0], 4)]])
        for key in args.loads.split(","):
            name, run = loads[key]
            results: dict[str, list[Result]] = {s.name: [] for s in up}
            for r in range(args.reps):
                for s in up:
                    before = s.work()
                    results[s.name].append(run(s, r))
                    if before is not None:
                        results[s.name][-1].work = tuple(np.subtract(s.work(), before).tolist())
            base = None
            for s in up:
                print(row(name, s.name, results[s.name], base, args.count), flush=True)
                base = base or statistics.median(x.tokens / x.seconds for x in results[s.name])
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        for s in every:
            s.stop()


def row(load: str, name: str, rs: list[Result], base: float | None, count: bool) -> str:
    """One table row: median tokens/s (and its ratio to the first server's), TTFT
    percentiles over every request of every rep, the answers' lengths, and with `count` the
    forward passes and rows of each rep."""
    tps = statistics.median(x.tokens / x.seconds for x in rs)
    ttft = [t for x in rs for t in x.ttft] or [float("nan")]
    p50, p95 = np.percentile(ttft, [50, 95]) * 1000
    lengths = np.percentile([n for x in rs for n, _ in x.got], [10, 50, 90])
    spread = "/".join(f"{x:.0f}" for x in lengths)
    work = ", ".join(f"{x.work[0]}/{x.work[1]}" for x in rs if x.work is not None)
    cell = f" {work or '-'} |" if count else ""
    return (f"| {load} | {name} | {tps:.1f} | {tps / (base or tps):.2f}x | {p50:.0f} | "
            f"{p95:.0f} | {spread} |{cell}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
