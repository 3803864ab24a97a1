"""Patch flavours the API server accepts, and the field ownership server-side apply keeps.

* JSON merge patch (RFC 7386),
* strategic merge patch (lists of named things merge by key; ``$patch``/``$setElementOrder``/
  ``$retainKeys``/``$deleteFromPrimitiveList`` directives understood well enough for kubectl re-apply),
* JSON patch (RFC 6902),
* server-side apply: fields owned per manager as ``fieldsV1``; applied fields that a manager no
  longer applies are removed; conflicts with other managers unless ``force``.
"""

from __future__ import annotations

import json
from typing import Any

from sandbox.core import HttpError
from sandbox.kube.store import clone

Obj = dict[str, Any]

# Merge keys of associative lists (strategic merge patch and server-side apply).
MERGE_KEYS: dict[str, str] = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath",
    "imagePullSecrets": "name", "conditions": "type", "ownerReferences": "uid",
    "hostAliases": "ip", "topologySpreadConstraints": "topologyKey", "resourceClaims": "name",
    "secrets": "name", "envFrom": "", "tolerations": "", "finalizers": "",
}


def merge_key_for(field: str, items: list[Any]) -> str | None:
    """The key list items of ``field`` merge on, or None for an atomic (replaced) list."""
    dicts = [i for i in items if isinstance(i, dict)]
    if not dicts or len(dicts) != len(items):
        return None
    if field == "ports":
        if all("containerPort" in i for i in dicts if i.get("$patch") != "delete" or "containerPort" in i):
            return "containerPort"
        if all("port" in i for i in dicts):
            return "port"
        return None
    key = MERGE_KEYS.get(field)
    if key == "":
        return None
    if key and all(key in i for i in dicts):
        return key
    if key is None and all("name" in i for i in dicts):
        return "name"
    return None


# ---- JSON merge patch -----------------------------------------------------------------------
def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return clone(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


# ---- strategic merge patch ------------------------------------------------------------------
def strategic_merge(target: Any, patch: Any, field: str = "") -> Any:
    if not isinstance(patch, dict):
        return clone(patch)
    if patch.get("$patch") == "replace":
        return {k: clone(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    out = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k.startswith("$setElementOrder/") or k in ("$retainKeys", "$patch"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            name = k.split("/", 1)[1]
            if isinstance(out.get(name), list):
                out[name] = [x for x in out[name] if x not in (v or [])]
            continue
        if v is None:
            out.pop(k, None)
        elif isinstance(v, list):
            out[k] = _merge_list(out.get(k), v, k)
        elif isinstance(v, dict):
            merged = strategic_merge(out.get(k), v, k)
            if merged is None:
                out.pop(k, None)
            else:
                out[k] = merged
        else:
            out[k] = clone(v)
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_list(live: Any, patch: list[Any], field: str) -> list[Any]:
    live = live if isinstance(live, list) else []
    key = merge_key_for(field, [p for p in patch if not (isinstance(p, dict) and p.get("$patch") == "replace")])
    if any(isinstance(p, dict) and p.get("$patch") == "replace" for p in patch):
        return [clone(p) for p in patch if not (isinstance(p, dict) and "$patch" in p)]
    if key is None or not all(isinstance(i, dict) for i in live):
        return [clone(p) for p in patch]
    out = [dict(i) for i in live]
    for item in patch:
        idx = next((n for n, cur in enumerate(out) if cur.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(strategic_merge({}, item, field))
        else:
            out[idx] = strategic_merge(out[idx], item, field)
    return out


# ---- JSON patch (RFC 6902) ------------------------------------------------------------------
def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise HttpError(422, f"invalid JSON pointer {path!r}", reason="Invalid")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    cur = doc
    for p in parts[:-1]:
        if isinstance(cur, list):
            try:
                cur = cur[int(p)]
            except (ValueError, IndexError):
                raise HttpError(422, f"JSON patch path not found: /{'/'.join(parts)}", reason="Invalid") from None
        elif isinstance(cur, dict) and p in cur:
            cur = cur[p]
        else:
            raise HttpError(422, f"doc is missing path: \"/{'/'.join(parts)}\": missing value", reason="Invalid")
    return cur, parts[-1]


def _get(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return doc
    parent, last = _parent(doc, parts)
    try:
        return parent[int(last)] if isinstance(parent, list) else parent[last]
    except (KeyError, ValueError, IndexError, TypeError):
        raise HttpError(422, f"doc is missing path: \"/{'/'.join(parts)}\": missing value", reason="Invalid") from None


def _remove(doc: Any, parts: list[str]) -> Any:
    parent, last = _parent(doc, parts)
    try:
        return parent.pop(int(last)) if isinstance(parent, list) else parent.pop(last)
    except (KeyError, ValueError, IndexError):
        raise HttpError(422, f"unable to remove nonexistent key: {last}: missing value", reason="Invalid") from None


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent, last = _parent(doc, parts)
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            try:
                parent.insert(int(last), value)
            except ValueError:
                raise HttpError(422, f"invalid array index {last!r}", reason="Invalid") from None
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise HttpError(422, "JSON patch target is not a container", reason="Invalid")
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise HttpError(400, "json patch must be a list of operations", reason="BadRequest")
    doc = clone(doc)
    for op in ops:
        kind, path = op.get("op"), _pointer(op.get("path", ""))
        if kind == "add":
            doc = _add(doc, path, clone(op.get("value")))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            if not path:
                doc = clone(op.get("value"))
            else:
                _get(doc, path)
                parent, last = _parent(doc, path)
                if isinstance(parent, list):
                    parent[int(last)] = clone(op.get("value"))
                else:
                    parent[last] = clone(op.get("value"))
        elif kind in ("move", "copy"):
            src = _pointer(op.get("from", ""))
            value = _remove(doc, src) if kind == "move" else clone(_get(doc, src))
            doc = _add(doc, path, value)
        elif kind == "test":
            if _get(doc, path) != op.get("value"):
                raise HttpError(422, f"testing value /{'/'.join(path)} failed", reason="Invalid")
        else:
            raise HttpError(400, f"unexpected JSON patch operation {kind!r}", reason="BadRequest")
    return doc


# ---- server-side apply: field sets ----------------------------------------------------------
Path = tuple[str, ...]


def _item_key(key: str, item: Obj) -> str:
    return "k:" + json.dumps({key: item.get(key)}, separators=(",", ":"))


def field_paths(obj: Any, prefix: Path = (), field: str = "") -> set[Path]:
    """Leaf paths of an applied config, in fieldsV1 spelling (f:name, k:{"name":"x"}, v:value)."""
    out: set[Path] = set()
    if isinstance(obj, dict):
        if not obj and prefix:
            out.add(prefix)
        for k, v in obj.items():
            out |= field_paths(v, prefix + (f"f:{k}",), k)
    elif isinstance(obj, list):
        key = merge_key_for(field, obj)
        if key is None or not obj:
            out.add(prefix)
        else:
            for item in obj:
                ip = prefix + (_item_key(key, item),)
                out.add(ip + (".",))
                out |= field_paths({k: v for k, v in item.items()}, ip, field)
    else:
        out.add(prefix)
    return out


def applied_paths(config: Obj) -> set[Path]:
    """What an apply of ``config`` claims: everything but identity fields and status."""
    body = {k: v for k, v in config.items() if k not in ("apiVersion", "kind", "status")}
    meta = {k: v for k, v in (body.get("metadata") or {}).items()
            if k in ("labels", "annotations", "finalizers", "ownerReferences")}
    body["metadata"] = meta
    if not meta:
        body.pop("metadata")
    return field_paths(body)


def to_fields_v1(paths: set[Path]) -> Obj:
    root: Obj = {}
    for path in sorted(paths):
        cur = root
        for part in path:
            cur = cur.setdefault(part, {})
    return root


def from_fields_v1(fields: Obj | None, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for k, v in (fields or {}).items():
        if k == ".":
            out.add(prefix + (".",))
        elif isinstance(v, dict) and v:
            out |= from_fields_v1(v, prefix + (k,))
        else:
            out.add(prefix + (k,))
    return out


def _value_at(obj: Any, path: Path) -> tuple[bool, Any]:
    cur = obj
    for part in path:
        if part == ".":
            continue
        if part.startswith("f:") and isinstance(cur, dict):
            name = part[2:]
            if name not in cur:
                return False, None
            cur = cur[name]
        elif part.startswith("k:") and isinstance(cur, list):
            want = json.loads(part[2:])
            cur = next((i for i in cur if isinstance(i, dict)
                        and all(i.get(k) == v for k, v in want.items())), None)
            if cur is None:
                return False, None
        else:
            return False, None
    return True, cur


def _delete_at(obj: Any, path: Path) -> None:
    if path and path[-1] == ".":
        path = path[:-1]
    if not path:
        return
    found, parent = _value_at(obj, path[:-1])
    if not found:
        return
    last = path[-1]
    if last.startswith("f:") and isinstance(parent, dict):
        parent.pop(last[2:], None)
    elif last.startswith("k:") and isinstance(parent, list):
        want = json.loads(last[2:])
        parent[:] = [i for i in parent if not (isinstance(i, dict)
                                                and all(i.get(k) == v for k, v in want.items()))]


def apply_merge(live: Any, config: Any, field: str = "") -> Any:
    """Merge an applied config into the live object (associative lists by key, others replaced)."""
    if isinstance(config, dict):
        out = dict(live) if isinstance(live, dict) else {}
        for k, v in config.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = apply_merge(out.get(k), v, k)
        return out
    if isinstance(config, list):
        key = merge_key_for(field, config)
        if key is None or not isinstance(live, list) or not all(isinstance(i, dict) for i in live):
            return clone(config)
        out = []
        live_by_key = {json.dumps(i.get(key)): i for i in live}
        seen = set()
        for item in config:
            k = json.dumps(item.get(key))
            seen.add(k)
            out.append(apply_merge(live_by_key.get(k), item, field))
        # items applied by someone else stay, after ours
        out += [clone(i) for i in live if json.dumps(i.get(key)) not in seen]
        return out
    return clone(config)


def path_string(path: Path) -> str:
    """``.spec.template.spec.containers[name="server"].env[name="A"].value`` like the API server prints."""
    out = ""
    for part in path:
        if part.startswith("f:"):
            out += "." + part[2:]
        elif part.startswith("k:"):
            out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(part[2:]).items()) + "]"
    return out


def get_managers(obj: Obj) -> list[Obj]:
    return list((obj.get("metadata") or {}).get("managedFields") or [])


def server_side_apply(live: Obj | None, config: Obj, *, manager: str, force: bool, now: str,
                      qualified: str) -> Obj:
    """The object after ``manager`` applies ``config`` to ``live`` (None: create)."""
    new_paths = applied_paths(config)
    managers = get_managers(live) if live else []
    mine = next((m for m in managers if m.get("manager") == manager and m.get("operation") == "Apply"), None)
    old_paths = from_fields_v1(mine.get("fieldsV1")) if mine else set()
    others = [m for m in managers if m is not mine]
    if live is not None and not force:
        conflicts = []
        for m in others:
            theirs = from_fields_v1(m.get("fieldsV1"))
            for p in sorted(new_paths & theirs):
                if p[-1] == ".":
                    continue
                ok_live, live_v = _value_at(live, p)
                _, new_v = _value_at(config, p)
                if ok_live and live_v != new_v and not isinstance(new_v, dict):
                    conflicts.append((m.get("manager"), m.get("apiVersion", ""), p))
        if conflicts:
            lines = [f'conflict with "{mgr}"' + (f" using {av}" if av else "") + ": " + path_string(p)
                     for mgr, av, p in conflicts]
            msg = (f"Apply failed with {len(conflicts)} conflict{'s' if len(conflicts) > 1 else ''}: "
                   + "\n".join(lines))
            causes = [{"reason": "FieldManagerConflict", "message": line, "field": path_string(p)}
                      for line, (_, _, p) in zip(lines, conflicts, strict=True)]
            raise HttpError(409, msg, reason="Conflict", body={"causes": causes})
    owned_by_others: set[Path] = set()
    new_others = []
    for m in others:
        theirs = from_fields_v1(m.get("fieldsV1"))
        if force or live is None:
            theirs -= new_paths  # ownership moves to the applier (without force: values agree, shared)
        owned_by_others |= theirs
        if theirs:
            m = dict(m)
            m["fieldsV1"] = to_fields_v1(theirs)
            new_others.append(m)
    base = clone(live) if live is not None else {}
    for p in sorted(old_paths - new_paths - owned_by_others, key=len, reverse=True):
        _delete_at(base, p)
    body = {k: v for k, v in config.items() if k not in ("status",)}
    result = apply_merge(base, body)
    entry = {"manager": manager, "operation": "Apply", "apiVersion": config.get("apiVersion", ""),
             "time": now, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(new_paths)}
    result.setdefault("metadata", {})["managedFields"] = new_others + [entry]
    return result


def record_update(old: Obj | None, new: Obj, *, manager: str, now: str, subresource: str = "") -> None:
    """Give ``manager`` (operation Update) the fields an update changed; others lose them."""
    strip = ("managedFields", "resourceVersion", "generation", "uid", "creationTimestamp", "selfLink")

    def body(o: Obj | None) -> Obj:
        if not o:
            return {}
        b = {k: v for k, v in o.items() if k not in ("apiVersion", "kind")}
        b["metadata"] = {k: v for k, v in (o.get("metadata") or {}).items() if k not in strip + ("name", "namespace")}
        if not subresource:
            b.pop("status", None)
        return b

    old_p, new_p = field_paths(body(old)), field_paths(body(new))
    # an existing list item's own marker (".") is not a change: a label patch must not take the item
    # from the manager that applied it (the API server gives an Update only the fields it changed)
    changed = {p for p in new_p if (p[-1] == "." and p not in old_p) or
               (p[-1] != "." and _value_at(old or {}, p) != _value_at(new, p))} | (old_p - new_p)
    changed = {p for p in changed if p in new_p}
    if not changed and old is not None:
        new.setdefault("metadata", {})["managedFields"] = get_managers(old)
        return
    managers = []
    mine_paths: set[Path] = set()
    for m in get_managers(old) if old else []:
        if m.get("manager") == manager and m.get("operation") == "Update" and m.get("subresource", "") == subresource:
            mine_paths = from_fields_v1(m.get("fieldsV1"))
            continue
        theirs = from_fields_v1(m.get("fieldsV1")) - changed
        theirs &= new_p | {p for p in theirs if p[-1] == "."}
        if theirs:
            m = dict(m)
            m["fieldsV1"] = to_fields_v1(theirs)
            managers.append(m)
    mine_paths = (mine_paths & new_p) | changed
    entry = {"manager": manager, "operation": "Update", "apiVersion": new.get("apiVersion", ""), "time": now,
             "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(mine_paths)}
    if subresource:
        entry["subresource"] = subresource
    new.setdefault("metadata", {})["managedFields"] = managers + [entry]
