"""A chat completion request read and checked: OpenAI's fields plus pertoken's extras.

Everything wrong with a body is an ApiError naming the field and the fix, before any work."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from pertoken.backends.base import POSITIONS, Condition, Steer, SteerTerm
from pertoken.backends.steer import OPS
from pertoken.errors import PertokenError
from pertoken.serve.protocol import ApiError
from pertoken.vectors import PersonaVector

ROLES = ("system", "developer", "user", "assistant")
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4
MAX_SEED = 2**63 - 1  # a seed is an int64 that is not negative
# Fields that would change the answer in ways this server does not implement.
UNSUPPORTED = ("tools", "functions", "tool_choice", "response_format", "audio")


@dataclass
class Limits:
    """The server's caps on a request."""

    max_tokens: int = 1024  # per choice
    max_slots: int = 32  # slots per batch: n may not exceed it


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int
    max_tokens_given: bool = True  # False: the cap, or less when the context holds less
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the top k
    steer: Steer | None = None
    steer_terms: list[dict] = field(default_factory=list)  # as the client wrote them
    monitor: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added logit, -100..100


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(
            400, f"the request body is not valid JSON ({e}): send a JSON object", code="bad_json"
        ) from None
    except RecursionError:
        raise ApiError(
            400, "the request body nests too deeply: send a flat JSON object", code="bad_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="bad_json")
    return body


def parse_request(
    body: dict,
    *,
    limits: Limits,
    vectors: dict[str, PersonaVector],
    n_layers: int,
    monitor_ok: bool,
    dtype: str = "float32",
) -> ChatRequest:
    """A checked ChatRequest from a decoded JSON body."""
    for name in UNSUPPORTED:
        if body.get(name):
            raise ApiError(400, f"{name!r} is not supported by pertoken serve", param=name)
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0.0) != 0:
            raise ApiError(
                400, f"{name} is not supported by pertoken serve: leave it 0", param=name
            )
    req = ChatRequest(
        messages=_messages(body.get("messages")), max_tokens=_max_tokens(body, limits)
    )
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    req.max_tokens_given = asked is not None
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    req.seed = _integer(body, "seed", None, 0, MAX_SEED)
    req.n = _integer(body, "n", 1, 1, limits.max_slots)
    req.stop = _stop(body.get("stop"))
    req.stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    req.include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    req.logprobs = _logprobs(body)
    req.logit_bias = _logit_bias(body.get("logit_bias"))
    req.steer_terms, req.steer = _steer(body, vectors, n_layers, dtype)
    req.monitor = _flag(body, "monitor")
    if req.monitor and not monitor_ok:
        raise ApiError(
            400,
            "monitor needs vectors and layers: start the server with --vector NAME=V.pt",
            param="monitor",
        )
    return req


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError(
            400, "messages must be a non-empty list of {role, content}", param="messages"
        )
    out = []
    for i, m in enumerate(value):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise ApiError(
                400, f"messages[{i}].role must be one of {', '.join(ROLES)}", param="messages"
            )
        role = "system" if role == "developer" else role
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _content(value, i: int) -> str:
    """A string, or OpenAI's list of {"type": "text", "text": ...} parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    raise ApiError(400, f"messages[{i}].content must be text", param="messages")


def _max_tokens(body: dict, limits: Limits) -> int:
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    value = _integer(body, name, limits.max_tokens, 1)
    if value > limits.max_tokens:
        raise ApiError(
            400,
            f"{name} {value} is above this server's cap of {limits.max_tokens}: ask for fewer, "
            "or start the server with a higher --max-tokens",
            param=name,
            code="max_tokens_above_cap",
        )
    return value


def _logprobs(body: dict) -> int | None:
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if not _flag(body, "logprobs"):
        if top:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def _logit_bias(value) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in -100..100} (-100 bans the token)."""
    if value is None:
        return None
    fix = 'give an object of token ids and biases in -100..100, e.g. {"50256": -100}'
    if not isinstance(value, dict):
        raise ApiError(400, f"logit_bias must be an object: {fix}", param="logit_bias")
    out: dict[int, float] = {}
    for k, b in value.items():
        try:
            token = int(k)
        except (TypeError, ValueError):
            raise ApiError(400, f"logit_bias key {k!r} is not a token id: {fix}",
                           param="logit_bias") from None  # fmt: skip
        number = isinstance(b, (int, float)) and not isinstance(b, bool)
        if not number or not math.isfinite(b) or not -100 <= b <= 100:
            raise ApiError(400, f"logit_bias of token {token} is {b!r}: {fix}", param="logit_bias")
        out[token] = float(b)
    return out or None


def _stop(value) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop takes at most {MAX_STOP} strings", param="stop")
    return stops


def _steer(body: dict, vectors: dict[str, PersonaVector], n_layers: int, dtype: str):
    terms_in = body.get("steer") or []
    positions = body.get("positions", "response")
    if positions not in POSITIONS:
        raise ApiError(400, f"positions must be one of {', '.join(POSITIONS)}", param="positions")
    if not isinstance(terms_in, list):
        raise ApiError(400, f"steer must be a list of {TERM_SHAPE}", param="steer")
    terms = [_term(t, i, vectors, n_layers) for i, t in enumerate(terms_in)]
    if not terms:
        return [], None
    steer = Steer(terms, positions)
    try:
        steer.validate(n_layers, len(terms[0].vector), dtype)
    except PertokenError as e:
        raise ApiError(400, f"steer: {e}", param="steer") from None
    keys = ("vector", "layer", "op", "coef", "lo", "hi", "mean", "when")
    return [{k: t[k] for k in keys if k in t} for t in terms_in], steer


TERM_SHAPE = '{"vector", "layer", "op": "add|ablate|cap", "coef", "lo", "hi", "mean", "when"}'


def _term(t, i: int, vectors: dict[str, PersonaVector], n_layers: int) -> SteerTerm:
    where = f"steer[{i}]"
    if not isinstance(t, dict):
        raise ApiError(400, f"{where} must be {TERM_SHAPE}", param="steer")
    name, layer = _place(t, where, vectors, n_layers)
    op = t.get("op", "add")
    if op not in OPS:
        raise ApiError(
            400, f"{where}: unknown op {op!r}; use one of {', '.join(OPS)}", param="steer"
        )
    kw = {k: _number(t, k, None, where=where) for k in ("coef", "lo", "hi", "mean")}
    if op == "add" and kw["coef"] is None:
        raise ApiError(400, f"{where}: coef is missing", param="steer")
    when = _when(t.get("when"), where, vectors, n_layers)
    try:
        return SteerTerm(
            layer, vectors[name].row(layer), kw["coef"] or 0.0, op=op, lo=kw["lo"],
            hi=kw["hi"], mean=kw["mean"] or 0.0, when=when, name=name,
        )  # fmt: skip
    except PertokenError as e:
        raise ApiError(400, f"{where}: {e}", param="steer") from None


def _place(t: dict, where: str, vectors: dict[str, PersonaVector], n_layers: int):
    """(vector name, layer) of a term or condition, both checked."""
    name = t.get("vector")
    if not isinstance(name, str) or name not in vectors:
        have = ", ".join(vectors) or "none (start the server with --vector NAME=V.pt)"
        raise ApiError(
            400, f"{where}: unknown vector {name!r}; this server has {have}", param="steer",
            code="unknown_vector",
        )  # fmt: skip
    layer = _integer(t, "layer", None, where=where)
    if layer is None or not 1 <= layer <= n_layers:
        raise ApiError(
            400, f"{where}: layer {layer} is outside 1..{n_layers} for this model", param="steer",
            code="layer_out_of_range",
        )  # fmt: skip
    return name, layer


def _when(w, where: str, vectors: dict[str, PersonaVector], n_layers: int) -> Condition | None:
    """{"vector", "layer", "above": T} or {..., "below": T} -> Condition."""
    if w is None:
        return None
    where = f"{where}.when"
    if not isinstance(w, dict) or ("above" in w) == ("below" in w):
        raise ApiError(
            400, f'{where} must be {{"vector", "layer", "above": T}} or {{..., "below": T}}',
            param="steer",
        )  # fmt: skip
    name, layer = _place(w, where, vectors, n_layers)
    side = "above" if "above" in w else "below"
    threshold = _number(w, side, None, where=where)
    try:
        return Condition(layer, vectors[name].row(layer), threshold, side == "above", name)
    except PertokenError as e:
        raise ApiError(400, f"{where}: {e}", param="steer") from None


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", param=name)
    return value


def _number(body: dict, name: str, default, lo=None, hi=None, *, where: str | None = None):
    value = body.get(name)
    if value is None:
        return default
    label = f"{where}.{name}" if where else name
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{label} must be a number", param=where or name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"{label} must be between {lo} and {hi}", param=where or name)
    return float(value)


def _integer(body: dict, name: str, default, lo=None, hi=None, *, where: str | None = None):
    value = body.get(name)
    if value is None:
        return default
    label = f"{where}.{name}" if where else name
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{label} must be an integer", param=where or name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(400, f"{label} must be {bound}", param=where or name)
    return value
