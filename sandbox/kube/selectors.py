"""Label and field selectors, parsed the way the API server does (set-based syntax included)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sandbox.core import HttpError

Obj = dict[str, Any]
Predicate = Callable[[Obj], bool]

_REQ = re.compile(
    r"""^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_.\-/]+)\s*
        (?:(?P<op>==|=|!=|\s+in\s+|\s+notin\s+)\s*(?P<val>\([^)]*\)|[A-Za-z0-9_.\-]*))?\s*$""",
    re.X,
)


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in (x.strip() for x in parts) if p]


def parse_label_selector(text: str | None) -> Predicate:
    """``a=b,c!=d,e in (x,y),f notin (z),g,!h`` -> predicate over a labels dict."""
    if not text:
        return lambda labels: True
    reqs: list[Callable[[dict[str, str]], bool]] = []
    for part in _split_top(text):
        m = _REQ.match(part)
        if not m:
            raise HttpError(400, f"unable to parse requirement: {part!r}", reason="BadRequest")
        key, op, val, neg = m["key"], (m["op"] or "").strip(), m["val"], bool(m["neg"])
        if neg:
            if op:
                raise HttpError(400, f"unable to parse requirement: {part!r}", reason="BadRequest")
            reqs.append(lambda lb, k=key: k not in lb)
        elif not op:
            reqs.append(lambda lb, k=key: k in lb)
        elif op in ("=", "=="):
            reqs.append(lambda lb, k=key, v=val: lb.get(k) == v)
        elif op == "!=":
            reqs.append(lambda lb, k=key, v=val: lb.get(k) != v)
        else:
            if not (val or "").startswith("("):
                raise HttpError(400, f"unable to parse requirement: {part!r}: expected (", reason="BadRequest")
            values = {v.strip() for v in val[1:-1].split(",") if v.strip()}
            if op == "in":
                reqs.append(lambda lb, k=key, vs=values: lb.get(k) in vs)
            else:
                reqs.append(lambda lb, k=key, vs=values: lb.get(k) not in vs)
    return lambda labels: all(r(labels) for r in reqs)


def match_selector_dict(selector: dict[str, str] | None, labels: dict[str, str] | None) -> bool:
    """A Service-style selector: every key equals. An empty selector matches nothing here."""
    if not selector:
        return False
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def match_label_selector(sel: Obj | None, labels: dict[str, str] | None) -> bool:
    """A metav1.LabelSelector (matchLabels + matchExpressions). Empty matches everything."""
    labels = labels or {}
    if not sel:
        return True
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in sel.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def selector_string(sel: Obj | None) -> str:
    """A metav1.LabelSelector as the string kubectl shows."""
    if not sel:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for expr in sel.get("matchExpressions") or []:
        op = expr.get("operator")
        if op in ("In", "NotIn"):
            parts.append(f"{expr['key']} {op.lower()} ({','.join(sorted(expr.get('values') or []))})")
        elif op == "Exists":
            parts.append(expr["key"])
        elif op == "DoesNotExist":
            parts.append("!" + expr["key"])
    return ",".join(parts)


def field_value(obj: Obj, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def parse_field_selector(text: str | None) -> Predicate:
    """``metadata.name=x,status.phase!=Running`` (any dotted field; missing fields are "")."""
    if not text:
        return lambda obj: True
    reqs: list[Predicate] = []
    for part in _split_top(text):
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise HttpError(400, f"invalid selector: {part!r}; can't understand", reason="BadRequest")
        path, op, val = m.groups()
        if op == "!=":
            reqs.append(lambda o, p=path, v=val: field_value(o, p) != v)
        else:
            reqs.append(lambda o, p=path, v=val: field_value(o, p) == v)
    return lambda obj: all(r(obj) for r in reqs)


def object_filter(label_selector: str | None, field_selector: str | None) -> Predicate:
    labels = parse_label_selector(label_selector)
    fields = parse_field_selector(field_selector)
    return lambda obj: labels((obj.get("metadata") or {}).get("labels") or {}) and fields(obj)
