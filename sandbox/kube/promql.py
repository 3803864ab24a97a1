"""A PromQL subset over the samples the sandbox's GMP collector scraped, and the Prometheus HTTP query API.

Google Managed Prometheus answers PromQL at
``monitoring.googleapis.com/v1/projects/PROJECT/location/global/prometheus/api/v1/query`` (and
``query_range``), in the Prometheus HTTP API's JSON (prometheus.io/docs/prometheus/latest/querying/api/,
cloud.google.com/stackdriver/docs/managed-prometheus/query-api-ui). The sandbox evaluates, over
``sandbox.kube.gmp`` series, what canary analysis asks:

* selectors ``name{l="v", l!="v", l=~"re", l!~"re"}`` (regexes fully anchored), instant (5 min lookback)
  and range ``[30s|5m|1h]``;
* the ``offset <duration>`` modifier on a selector (a counter's value where a window starts);
* ``rate`` / ``increase`` (counter resets handled, extrapolated to the window's edges as Prometheus does),
  ``histogram_quantile(φ, …)`` (linear within the bucket, the highest finite bound for the ``+Inf`` one);
* ``sum|avg|min|max|count [by (…)] (…)``; ``+ - * /`` between scalars and vectors, vectors matched on
  identical label sets (no ``on``/``ignoring``/``group_left``); ``or`` and ``vector(s)`` (``… or vector(0)``:
  a counter that never moved, e.g. no 5xx yet, is 0 rather than no data).

Anything else is a ``bad_data`` error naming what is not supported, as Prometheus does for a parse error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Labels = tuple[tuple[str, str], ...]
Series = list[tuple[float, float]]
# name -> [(labels incl. __name__, samples oldest first)]
Source = Callable[[str], list[tuple[dict[str, str], Series]]]
LOOKBACK_S = 300.0
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TOKEN = re.compile(r'\s*(?:(?P<bdur>\d+(?:ms|s|m|h|d|w))(?![a-zA-Z0-9_:])|'
                    r'(?P<num>\d+(?:\.\d+)?(?:e[-+]?\d+)?)(?![a-zA-Z_:])|(?P<dur>\[\d+(?:ms|s|m|h|d|w)\])|'
                    r'(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>=~|!~|!=|[-+*/(){},=])|(?P<id>[a-zA-Z_:][a-zA-Z0-9_:]*))')
AGGREGATIONS = ("sum", "avg", "min", "max", "count")


class PromQLError(ValueError):
    pass


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w)", text)
    if not m:
        raise PromQLError(f'bad duration "{text}"')
    return int(m.group(1)) * _UNITS[m.group(2)]


# ---- parsing -----------------------------------------------------------------------------------------------
@dataclass
class Sel:
    name: str
    matchers: list[tuple[str, str, str]]
    range_s: float | None = None
    offset_s: float = 0.0  # ``offset <duration>``: evaluated that long before the query's time


@dataclass
class Num:
    value: float


@dataclass
class Call:
    fn: str
    args: list[Any]
    by: list[str] | None = None


@dataclass
class Bin:
    op: str
    left: Any
    right: Any


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise PromQLError(f"parse error at char {pos + 1}: unexpected character {text[pos]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str]:
        return self.toks[self.i] if self.i < len(self.toks) else ("eof", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if value is not None and tok[1] != value:
            raise PromQLError(f'parse error: expected "{value}", got "{tok[1] or "end of input"}"')
        self.i += 1
        return tok

    def parse(self) -> Any:
        node = self.expr()
        if self.peek()[0] != "eof":
            raise PromQLError(f'parse error: unexpected "{self.peek()[1]}"')
        return node

    def expr(self) -> Any:
        node = self.arith()
        while self.peek()[1] == "or":
            self.take()
            node = Bin("or", node, self.arith())
        return node

    def arith(self) -> Any:
        node = self.term()
        while self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            node = Bin(op, node, self.term())
        return node

    def term(self) -> Any:
        node = self.atom()
        while self.peek()[1] in ("*", "/"):
            op = self.take()[1]
            node = Bin(op, node, self.atom())
        return node

    def _labels(self) -> list[str]:
        self.take("(")
        out = []
        while self.peek()[1] != ")":
            out.append(self.take()[1])
            if self.peek()[1] == ",":
                self.take()
        self.take(")")
        return out

    def atom(self) -> Any:
        kind, value = self.peek()
        if kind == "num":
            self.take()
            return Num(float(value))
        if value == "(":
            self.take()
            node = self.expr()
            self.take(")")
            return node
        if kind != "id":
            raise PromQLError(f'parse error: unexpected "{value or "end of input"}"')
        self.take()
        if value in AGGREGATIONS:
            by = self._labels() if self.peek()[1] == "by" and self.take() else None
            self.take("(")
            inner = self.expr()
            self.take(")")
            if by is None and self.peek()[1] == "by":
                self.take()
                by = self._labels()
            return Call(value, [inner], by or [])
        if self.peek()[1] == "(" and value in ("rate", "increase", "histogram_quantile", "vector"):
            self.take()
            args = [self.expr()]
            while self.peek()[1] == ",":
                self.take()
                args.append(self.expr())
            self.take(")")
            return Call(value, args)
        if self.peek()[1] == "(":
            raise PromQLError(f'unknown function "{value}" (the sandbox evaluates rate, increase, '
                              f'histogram_quantile, vector, {", ".join(AGGREGATIONS)})')
        sel = Sel(value, [])
        if self.peek()[1] == "{":
            self.take()
            while self.peek()[1] != "}":
                label = self.take()[1]
                op = self.take()[1]
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f'parse error: unexpected "{op}" in label matching')
                kind, raw = self.take()
                if kind != "str":
                    raise PromQLError(f"parse error: label value for {label} must be a string")
                sel.matchers.append((label, op, raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")))
                if self.peek()[1] == ",":
                    self.take()
            self.take("}")
        if self.peek()[0] == "dur":
            sel.range_s = parse_duration(self.take()[1][1:-1])
        if self.peek() == ("id", "offset"):
            self.take()
            kind, raw = self.take()
            if kind != "bdur":
                raise PromQLError(f'parse error: expected a duration after "offset", got "{raw or "end of input"}"')
            sel.offset_s = parse_duration(raw)
        return sel


def parse(text: str) -> Any:
    return _Parser(text).parse()


# ---- evaluation ----------------------------------------------------------------------------------------------
def _key(labels: dict[str, str]) -> Labels:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for name, op, want in matchers:
        have = labels.get(name, "")
        if op == "=" and have != want or op == "!=" and have == want:
            return False
        if op in ("=~", "!~") and bool(re.fullmatch(want, have)) != (op == "=~"):
            return False
    return True


def _select(src: Source, sel: Sel) -> list[tuple[dict[str, str], Series]]:
    return [(labels, samples) for labels, samples in src(sel.name) if _matches(labels, sel.matchers)]


def _increase(samples: Series, start: float, end: float) -> float | None:
    pts = [(t, v) for t, v in samples if start < t <= end]
    if len(pts) < 2:
        return None
    delta, prev = 0.0, pts[0][1]
    for _, v in pts[1:]:
        delta += v - prev if v >= prev else v  # a counter reset starts again from 0
        prev = v
    first, last = pts[0][0], pts[-1][0]
    sampled = last - first
    avg = sampled / (len(pts) - 1)
    # Prometheus' extrapolatedRate: extend to the window's edges when the gap is under 1.1 intervals
    to_start = first - start if first - start < avg * 1.1 else avg / 2
    to_end = end - last if end - last < avg * 1.1 else avg / 2
    if delta > 0 and pts[0][1] >= 0:
        to_start = min(to_start, sampled * pts[0][1] / delta if delta else to_start)
    return delta * (sampled + to_start + to_end) / sampled if sampled > 0 else None


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    buckets = sorted(buckets)
    if not buckets or buckets[-1][0] != math.inf or buckets[-1][1] == 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == math.inf:
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


Vector = dict[Labels, float]


def evaluate(node: Any, src: Source, at: float) -> float | Vector:
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Sel):
        if node.range_s is not None:
            raise PromQLError("a range vector must be the argument of rate() or increase()")
        out: Vector = {}
        at -= node.offset_s
        for labels, samples in _select(src, node):
            recent = [v for t, v in samples if at - LOOKBACK_S < t <= at]
            if recent:
                out[_key(labels)] = recent[-1]
        return out
    if isinstance(node, Bin):
        a, b = evaluate(node.left, src, at), evaluate(node.right, src, at)
        return _binary(node.op, a, b)
    if isinstance(node, Call):
        return _call(node, src, at)
    raise PromQLError(f"cannot evaluate {node!r}")


def _apply(op: str, x: float, y: float) -> float:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x / y if y else (math.nan if x == 0 else math.copysign(math.inf, x))


def _binary(op: str, a: float | Vector, b: float | Vector) -> float | Vector:
    if op == "or":
        if isinstance(a, float) or isinstance(b, float):
            raise PromQLError("set operator \"or\" not allowed in binary scalar expression")
        return {**b, **a}
    if isinstance(a, float) and isinstance(b, float):
        return _apply(op, a, b)
    if isinstance(a, float):
        return {k: _apply(op, a, v) for k, v in b.items()}  # type: ignore[union-attr]
    if isinstance(b, float):
        return {k: _apply(op, v, b) for k, v in a.items()}
    return {k: _apply(op, v, b[k]) for k, v in a.items() if k in b}


def _call(node: Call, src: Source, at: float) -> float | Vector:
    if node.fn in ("rate", "increase"):
        sel = node.args[0]
        if not isinstance(sel, Sel) or sel.range_s is None:
            raise PromQLError(f"expected type range vector in call to function \"{node.fn}\"")
        out: Vector = {}
        end = at - sel.offset_s
        for labels, samples in _select(src, sel):
            inc = _increase(samples, end - sel.range_s, end)
            if inc is not None:
                out[_key(labels)] = inc / sel.range_s if node.fn == "rate" else inc
        return out
    if node.fn == "vector":
        v = evaluate(node.args[0], src, at)
        if not isinstance(v, float):
            raise PromQLError("expected type scalar in call to function \"vector\"")
        return {(): v}
    if node.fn == "histogram_quantile":
        q = evaluate(node.args[0], src, at)
        vec = evaluate(node.args[1], src, at)
        if not isinstance(q, float) or isinstance(vec, float):
            raise PromQLError("histogram_quantile(scalar, instant vector)")
        groups: dict[Labels, list[tuple[float, float]]] = {}
        for key, v in vec.items():
            labels = dict(key)
            le = labels.pop("le", None)
            if le is None:
                continue
            groups.setdefault(_key(labels), []).append((float(le), v))
        return {k: _quantile(q, bs) for k, bs in groups.items()}
    inner = evaluate(node.args[0], src, at)
    if isinstance(inner, float):
        raise PromQLError(f"expected type instant vector in aggregation expression {node.fn}")
    grouped: dict[Labels, list[float]] = {}
    for key, v in inner.items():
        labels = dict(key)
        grouped.setdefault(tuple(sorted((k, labels.get(k, "")) for k in node.by or [] if k in labels)),
                           []).append(v)
    fns = {"sum": sum, "avg": lambda xs: sum(xs) / len(xs), "min": min, "max": max, "count": len}
    return {k: float(fns[node.fn](vs)) for k, vs in grouped.items()}


def query(text: str, src: Source, at: float) -> float | Vector:
    return evaluate(parse(text), src, at)


def scalar_of(result: float | Vector) -> float | None:
    """The one value of a query that aggregates to a single series (None: no series; NaN stays NaN)."""
    if isinstance(result, float):
        return result
    return next(iter(result.values())) if len(result) == 1 else None


# ---- the HTTP API's JSON ------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if v != int(v) else str(int(v))


def api_query(text: str, src: Source, at: float) -> dict[str, Any]:
    result = query(text, src, at)
    if isinstance(result, float):
        return {"status": "success", "data": {"resultType": "scalar", "result": [at, _fmt(result)]}}
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": dict(k), "value": [at, _fmt(v)]} for k, v in sorted(result.items())]}}


def api_query_range(text: str, src: Source, start: float, end: float, step: float) -> dict[str, Any]:
    if step <= 0 or (end - start) / step > 11000:
        raise PromQLError("exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the "
                          "query resolution (?step=XX)")
    node = parse(text)
    series: dict[Labels, list[list[Any]]] = {}
    t = start
    while t <= end + 1e-9:
        result = evaluate(node, src, t)
        for k, v in ({(): result} if isinstance(result, float) else result).items():
            series.setdefault(k, []).append([t, _fmt(v)])
        t += step
    return {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": dict(k), "values": vs} for k, vs in sorted(series.items())]}}


def gmp_source(collectors: list[Any]) -> Source:
    """Series of one or more ``sandbox.kube.gmp.GmpCollector`` as the evaluator reads them."""
    def src(name: str) -> list[tuple[dict[str, str], Series]]:
        out = []
        for gmp in collectors:
            for s in gmp.series({"__name__": name}):
                out.append((dict(s["labels"]), [(float(t), float(v)) for t, v in s["samples"]]))
        return out
    return src


def api_error(message: str) -> dict[str, Any]:
    return {"status": "error", "errorType": "bad_data", "error": message}


# ---- the HTTP API itself ----------------------------------------------------------------------------------
def handle(params: dict[str, str], kind: str, collectors: list[Any]) -> tuple[int, dict[str, Any]]:
    """One ``/api/v1/query`` or ``/api/v1/query_range`` request over ``collectors`` -> (status, JSON)."""
    now = min((c.now() for c in collectors), default=0.0)
    try:
        src = gmp_source(collectors)
        if not params.get("query"):
            raise PromQLError("parameter 'query' is required")
        if kind == "query":
            return 200, api_query(params["query"], src, float(params.get("time") or now))
        step = params.get("step") or "15"
        return 200, api_query_range(params["query"], src, float(params["start"]), float(params["end"]),
                                    parse_duration(step) if step[-1:].isalpha() else float(step))
    except KeyError as exc:
        return 400, api_error(f"parameter {exc} is required")
    except (PromQLError, ValueError) as exc:
        return 400, api_error(str(exc))


def serve_query_api(collectors: list[Any], *, project: str = "sandbox-project") -> Any:
    """A loopback server answering GMP's query paths over ``collectors`` (a lone KubeCluster's; the full
    sandbox serves the same paths on its control endpoint for every cluster of a project)."""
    from urllib.parse import parse_qs

    from sandbox.core import JsonHandler, route, serve

    routes: list = []
    path = r"/v1/projects/(?P<project>[^/]+)/location/global/prometheus/api/v1/(?P<kind>query|query_range)"

    @route(routes, "GET", path)
    @route(routes, "POST", path)
    def _q(h: Any, project: str, kind: str) -> Any:
        params = {k: v[-1] for k, v in parse_qs(h.url.query).items()}
        if h.command == "POST":
            params |= {k: v[-1] for k, v in parse_qs(h.body_bytes().decode()).items()}
        return handle(params, kind, collectors)

    handler = type("GmpQueryHandler", (JsonHandler,), {"service": "monitoring", "routes": routes})
    return serve(handler, state=None, faults=None)
