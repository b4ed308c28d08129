"""`pertoken serve` under load against the backend's own batched `generate`, in one run.

    python benchmarks/bench_serve.py                         # random Llama 512x8 on the CPU
    python benchmarks/bench_serve.py --model M --backend mlx # a real chat model (a Mac, a GPU)

C clients (1, 4, 16) each send --requests chat completions one after another to a `pertoken
serve` subprocess (greedy, --new-tokens each, every other client steered by a vector), as JSON
and as SSE streams with per-token projections. The baseline is `generate` on the same prompts
with the same per-row steering, C rows per batch. Prints aggregate tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from pertoken.backends import Steer, load_backend
from pertoken.backends.base import Streaming
from pertoken.vectors import PersonaVector, save_vector

# Turns joined by spaces: every word of a chat stays a token of the word-level vocabulary.
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


def questions(n: int, length: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"t{i}" for i in rng.integers(2, 1000, length)) for _ in range(n)]


def baseline(backend, chats: list[str], steers: list, new: int, clients: int) -> float:
    """Seconds of `generate` over every prompt, `clients` rows a batch."""
    t0 = time.perf_counter()
    backend.generate(chats, max_new_tokens=new, temperature=0, steer=steers, batch_size=clients)
    return time.perf_counter() - t0


def answer_tokens(backend, chats: list[str], steers: list, new: int) -> int:
    """How many tokens `generate` writes for these prompts (greedy: the same every run)."""
    steps = []
    backend.generate(chats, max_new_tokens=new, temperature=0, steer=steers,
                     stream=Streaming(steps.append))  # fmt: skip
    return len(steps)


def load(http: list[httpx.Client], model: str, qs, new: int, *, stream: bool) -> tuple[float, int]:
    """Seconds and completion tokens for every client sending its questions in turn, each on
    its own open connection, all starting together."""
    tokens = [0] * len(qs)
    start = threading.Barrier(len(qs) + 1)

    def client(c: int) -> None:
        start.wait()
        for q in qs[c]:
            tokens[c] += _one(http[c], _body(model, q, new, c, stream))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(qs))]
    [t.start() for t in threads]
    start.wait()
    t0 = time.perf_counter()
    [t.join() for t in threads]
    return time.perf_counter() - t0, sum(tokens)


def _body(model: str, q: str, new: int, c: int, stream: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": new,
            "temperature": 0, "stream": stream, "steer": STEER if c % 2 else []}  # fmt: skip
    if stream:
        body |= {"monitor": True, "stream_options": {"include_usage": True}}
    return body


def _one(http: httpx.Client, body: dict) -> int:
    if not body["stream"]:
        r = http.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]
    import json

    used = 0
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                used = usage["completion_tokens"] if usage else used
    return used


STEER = [{"vector": "v", "layer": 2, "coef": 4.0}]


def start_server(args, model: str, vector: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from pertoken.cli import main; main()", "serve", "--model", model,
           "--backend", args.backend, "--port", str(port), "--vector", f"v={vector}",
           "--layers", "2", "--max-batch", "32", "--max-tokens", str(args.new_tokens),
           "--batch-window", str(args.batch_window)]  # fmt: skip
    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.get(url + "/v1/models").raise_for_status()
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit(proc.stderr.read().decode()) from None
            time.sleep(0.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a chat model folder or hub id")
    ap.add_argument("--random", default="512x8", help="random Llama HIDDENxLAYERS (no --model)")
    ap.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-window", type=float, default=20.0, help="the server's, in ms")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (both sides)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    model = args.model or str(random_chat_llama(*map(int, args.random.split("x")), tmp / "m"))
    bk = load_backend(model, args.backend)
    vec = np.random.default_rng(0).standard_normal((bk.n_layers + 1, bk.hidden_size))
    vector = save_vector(PersonaVector(vec.astype(np.float32)), tmp / "v.pt")
    steer = Steer.single(2, vec[2].astype(np.float32), 4.0, "response")
    proc, url = start_server(args, model, vector)
    name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    print(f"{bk.model_id} ({bk.name}, {bk.dtype}, {bk.device}), {args.new_tokens} new tokens, "
          f"{args.requests} requests per client, median of {args.reps}")  # fmt: skip
    head = (
        "| clients | generate tok/s | serve JSON tok/s | ratio | serve SSE+monitor tok/s | ratio |"
    )
    print(head + " rows per batch |\n" + "| --- " * 7 + "|")
    try:
        for clients in map(int, args.clients.split(",")):
            qs = [questions(args.requests, args.prompt_len, seed=c) for c in range(clients)]
            order = [(c, q) for r in range(args.requests) for c, q in enumerate(x[r] for x in qs)]
            chats = [bk.chat_messages([{"role": "user", "content": q}]) for _, q in order]
            steers = [steer if c % 2 else None for c, _ in order]
            http = [httpx.Client(base_url=url, timeout=600) for _ in range(clients)]
            before = httpx.get(url + "/api/stats").json()
            rates = _rates(args, bk, http, name, qs, chats, steers, clients)
            after = httpx.get(url + "/api/stats").json()
            [h.close() for h in http]
            per_batch = (after["rows"] - before["rows"]) / (after["batches"] - before["batches"])
            base, js, sse = (statistics.median(r) for r in rates)
            print(f"| {clients} | {base:.0f} | {js:.0f} | {js / base:.2f}x | {sse:.0f} | "
                  f"{sse / base:.2f}x | {per_batch:.1f} |")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def _rates(args, bk, http, name, qs, chats, steers, clients) -> list[list[float]]:
    """tokens/s of (generate, serve JSON, serve SSE) per rep, interleaved, after a warm-up."""
    n = answer_tokens(bk, chats, steers, args.new_tokens)
    runs = [
        lambda: (baseline(bk, chats, steers, args.new_tokens, clients), n),
        lambda: load(http, name, qs, args.new_tokens, stream=False),
        lambda: load(http, name, qs, args.new_tokens, stream=True),
    ]
    counts = [run()[1] for run in runs]  # the warm-up
    if len(set(counts)) != 1:
        print(f"  (token counts differ: generate {counts[0]}, JSON {counts[1]}, SSE {counts[2]})")
    rates = [[], [], []]
    for _ in range(args.reps):
        for run, out in zip(runs, rates):
            seconds, tokens = run()
            out.append(tokens / seconds)
    return rates


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
