"""Fleets of specs, pure: the bundled spec picker, fleet files, and who shares what.

A fleet file is a YAML list of spec paths (or a mapping with ``specs:``), relative to the file:

    # deployments/fleets/demo.yaml
    specs:
      - ../gemma2-2b-it-vllm-l4.yaml
      - ../qwen2.5-7b-sglang.yaml
"""

from __future__ import annotations

import functools
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema

from manifests import yamlio
from manifests.spec import DeploymentSpec, SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DIR = ROOT / "deployments"


def bundled_specs() -> list[str]:
    """Paths (relative to the repo) of the bundled specs: what the UI's spec picker offers."""
    return [f"deployments/{p.name}" for p in sorted(BUNDLED_DIR.glob("*.yaml"))]


# A dropdown in the Prefect UI (the parameter schema is an enum of the bundled specs). Flows accept
# ``SpecPath | str`` so any other file (or a mapping) still works from the CLI and the API.
SpecPath = Literal[tuple(bundled_specs())]  # type: ignore[valid-type]

DURATION_HELP = "a duration: 90s, 5m, 1.5h, 2d (or ISO 8601: PT5M)"


def _shorthands() -> dict[str, str]:
    """Fields a spec may give as one string (``model: google/gemma-2-2b-it`` is ``model: {id: ...}``): read
    from the fields' own ``_shorthand`` validators, so the form offers exactly what the spec accepts."""
    out: dict[str, str] = {}
    for name, field in DeploymentSpec.model_fields.items():
        for meta in field.metadata:
            func = getattr(meta, "func", None)
            if getattr(func, "__name__", "") == "to_mapping" and func.__closure__:
                out[name] = func.__closure__[0].cell_contents
    return out


def spec_form_schema() -> dict[str, Any]:
    """The JSON schema of a spec given as a mapping: the Prefect UI's form for it (fields, enums, defaults,
    patterns, help) and what the Prefect server checks a deployment run's ``spec`` mapping against.

    DeploymentSpec's own schema, made to accept what the spec accepts: ``$ref``s inlined (the UI and the
    server see this one property, not the model's ``$defs``), durations as text ("5m", not only ISO 8601),
    and the one-string shorthands. tests/unit/test_spec_form.py checks every bundled spec against it."""
    schema = DeploymentSpec.model_json_schema(mode="validation")
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {**target, **{k: inline(v) for k, v in node.items() if k != "$ref"}}
        if node.get("format") == "duration":
            node = {k: v for k, v in node.items() if k != "format"}
            node["description"] = f"{node['description'].rstrip('.')}; {DURATION_HELP}" if node.get("description") \
                else DURATION_HELP
        out = {k: inline(v) for k, v in node.items()}
        if isinstance(out.get("properties"), dict):  # a field's own title, not its model's ("Engine", not "EngineSpec")
            out["properties"] = {k: {**p, "title": k.replace("_", " ").title()} if p.get("title") in defs else p
                                 for k, p in out["properties"].items()}
        if "anyOf" in out:  # an optional field's empty tab says what it is ("not set", as the date pickers'), not "None"
            out["anyOf"] = [{**o, "title": "not set"} if o == {"type": "null"} else o for o in out["anyOf"]]
        return out

    schema = inline(schema)
    for name, key in _shorthands().items():
        full = schema["properties"][name]
        keep = {k: full.pop(k) for k in ("default", "title") if k in full}
        keep["title"] = name.replace("_", " ").title()
        if full.get("description"):  # the field's help shows above its tabs (the UI reads the property's)
            keep["description"] = full["description"]
        schema["properties"][name] = {**keep, "anyOf": [
            {"type": "string", "title": key, "description": f"{name}: X is {name}: {{{key}: X}}"}, full]}
    return {**schema, "title": "spec (mapping)"}


# A flow's ``spec`` parameter: the Prefect UI shows one tab per union member, labelled by its title
# (without titles: "str | str | dict", two identical tabs); the mapping's tab is a form of the spec's fields.
SpecParam = (Annotated[SpecPath, Field(title="bundled spec")] | Annotated[str, Field(title="spec file")]
             | Annotated[dict[str, Any], WithJsonSchema(spec_form_schema())])

# A spec file (no mapping): the bundled dropdown or another path.
SpecFileParam = Annotated[SpecPath, Field(title="bundled spec")] | Annotated[str, Field(title="spec file")]

def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


# An optional text parameter (a revision, a reason): one text field in the UI form, not a "str | None"
# pair of tabs opening on "None"; leaving it empty (or omitting it) means None. The form fills a field in
# from its schema's default, so that default is "" (an empty field): a null default left the run form
# impossible to submit as it opened ("None is not of type 'string'", the UI's check and the server's).
EMPTY = (BeforeValidator(_empty_is_none), Field(json_schema_extra={"default": ""}))
OptionalText = Annotated[str | None, EMPTY[0], EMPTY[1], WithJsonSchema({"type": "string"})]
# Optional dates and times: the UI's date / date-time picker (ISO strings from the CLI and the API). An empty
# picker is no valid date ("'' is not a 'date'"), so these open on a "not set" tab (null) beside the picker.
OptionalDate = Annotated[date | None, WithJsonSchema(
    {"anyOf": [{"type": "string", "format": "date", "title": "date"}, {"type": "null", "title": "not set"}]})]
OptionalDateTime = Annotated[datetime | None, WithJsonSchema(
    {"anyOf": [{"type": "string", "format": "date-time", "title": "date and time"},
               {"type": "null", "title": "not set"}]})]


def bundled_fleets() -> list[str]:
    """Fleet files bundled under deployments/fleets/ (kept apart so spec globs never see them)."""
    return [f"deployments/fleets/{p.name}" for p in sorted((BUNDLED_DIR / "fleets").glob("*.yaml"))]


def fleet_paths(data: Any, *, base: Path, source: str = "(fleet)") -> list[Path]:
    """The spec paths a fleet file lists, resolved against the file's directory (then the repo)."""
    items = data.get("specs") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise SpecError("specs", "a fleet file is a non-empty list of spec paths",
                        "write `specs: [deployments/a.yaml, deployments/b.yaml]`", source=source)
    out: list[Path] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise SpecError(f"specs[{i}]", f"{item!r} is not a path", "list spec file paths as strings",
                            source=source)
        for cand in (base / item, ROOT / item, Path(item)):
            if cand.exists():
                out.append(cand.resolve())
                break
        else:
            raise SpecError(f"specs[{i}]", f"{item} does not exist", f"check the path (relative to {base})",
                            source=source)
    if len(set(out)) != len(out):
        raise SpecError("specs", "a spec is listed twice", "list each spec once", source=source)
    return out


def load_fleet(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    try:
        data = yamlio.load(path.read_text())
    except OSError as exc:
        raise SpecError("(file)", f"cannot read {path}: {exc.strerror}", "check the path", source=str(path)) from None
    return fleet_paths(data, base=path.parent, source=str(path))


def check_fleet_specs(specs: list[DeploymentSpec]) -> None:
    """Two specs of one name in one project would fight over the same objects."""
    seen: dict[tuple[str, str, str], int] = {}
    for i, s in enumerate(specs):
        key = (s.cluster.project, s.namespace, s.name)
        if key in seen:
            raise SpecError(f"specs[{i}].name", f"{s.name} is already used by specs[{seen[key]}] in "
                            f"{s.cluster.project}/{s.namespace}", "give each model its own name")
        seen[key] = i


def cluster_key(spec: DeploymentSpec) -> tuple[str, str, str]:
    return spec.cluster.project, spec.cluster.location, spec.cluster.name


def pool_key(spec: DeploymentSpec) -> tuple[str, str, str, str]:
    return (*cluster_key(spec), spec.accelerator.pool.name)


def same_cluster(a: DeploymentSpec, b: DeploymentSpec) -> bool:
    return cluster_key(a) == cluster_key(b)


def uses_pool(a: DeploymentSpec, b: DeploymentSpec) -> bool:
    """On Autopilot there is no pool: GKE provisions nodes per pod."""
    return a.cluster.mode == "standard" and b.cluster.mode == "standard" and pool_key(a) == pool_key(b)


def load_specs(paths: list[str | Path]) -> list[DeploymentSpec]:
    return [load_spec(p) for p in paths]


@functools.lru_cache(maxsize=4)
def _project(project_file: Path, mtime_ns: int) -> tuple[dict[str, Any], ...]:
    """prefect.yaml's deployments, read again when the file changes (the mtime is part of the key)."""
    return tuple((yamlio.load(project_file.read_text()) or {}).get("deployments") or [])


def deployment_name(flow: str, *, project_file: Path = ROOT / "prefect.yaml") -> str:
    """``<flow>/<deployment>`` of the deployment prefect.yaml declares for the flow function ``flow`` (its
    entrypoint ``flows/<file>.py:<flow>``): each name is written once, in prefect.yaml."""
    deployments = _project(project_file, project_file.stat().st_mtime_ns)
    found = [d["name"] for d in deployments if str(d.get("entrypoint", "")).endswith(f":{flow}")]
    if len(found) != 1:
        raise SpecError(f"{project_file.name} deployments", f"{len(found)} deployments run the flow {flow}",
                        "declare exactly one per flow")
    return f"{flow}/{found[0]}"
