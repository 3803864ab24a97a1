"""The shape docs/architecture.md draws, checked from the source's own imports (ast, nothing imported).

- no import cycle among the product packages (a lazy import inside a function counts: it is the same
  dependency, only later; an import under ``if TYPE_CHECKING:`` does not: it never runs);
- no ``flows/*`` module imports another ``flows/*`` module, and no ``flows/`` file is over 300 lines;
- the layers: the pure core imports no I/O layer, tasks import no target or flow, targets import no flow.
The sandbox is not a product package: its own circles are one component's inside (commented where they are).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("flows", "targets", "tasks", "manifests", "llm_fleet", "servers")


def _modules(packages: tuple[str, ...] = PRODUCT) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str, modules: dict[str, Path] | None = None) -> str | None:
    """The module an imported name lives in (``a.b.c`` -> ``a.b.c`` or ``a.b``), None if foreign."""
    modules = MODULES if modules is None else modules
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None) if isinstance(child, ast.If) else None
            if test is not None and (getattr(test, "id", None) == "TYPE_CHECKING"
                                     or getattr(test, "attr", None) == "TYPE_CHECKING"):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports_of(module: str, modules: dict[str, Path] | None = None) -> set[str]:
    modules = MODULES if modules is None else modules
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            # ``from pkg import sub`` depends on the submodule; ``from pkg import name`` on pkg's own code
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            target = _resolve(name, modules)
            if target and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Each product module's imports. Built when a test here runs, not when the module is collected: every
    worker collects this file, one runs it."""
    return {m: imports_of(m) for m in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_lazy_imports_but_not_type_checking_ones(tmp_path, monkeypatch):
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tasks import k8s\n"
                    "def f():\n    from tasks import gke\n")
    monkeypatch.setitem(MODULES, "flows.m", path)
    assert imports_of("flows.m") == {"tasks.gke"}


def test_no_import_cycle_among_the_product_packages(graph):
    found = cycles(graph)
    assert not found, "import cycles (break each by moving the shared part to the module it belongs to): " + \
        "; ".join(" <-> ".join(c) for c in found)


def test_no_flow_imports_another_flow(graph):
    bad = sorted(f"{m} imports {d}" for m, deps in graph.items() if m.startswith("flows.")
                 for d in deps if d.startswith("flows."))
    assert not bad, "flows never import each other (a subflow is named by its entrypoint): " + "; ".join(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "flows").glob("*.py")), ids=lambda p: p.name)
def test_flow_files_are_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 300, f"{path.name} has {lines} lines: move its steps to targets/<target>/"


@pytest.mark.parametrize(("layer", "forbidden"), [
    ("manifests", ("tasks", "targets", "flows", "servers", "llm_fleet")),
    ("tasks", ("targets", "flows", "servers", "llm_fleet")),
    ("targets", ("flows", "servers", "llm_fleet")),
])
def test_layers(layer, forbidden, graph):
    bad = sorted(f"{m} imports {d}" for m, deps in graph.items() if m.split(".")[0] == layer
                 for d in deps if d.split(".")[0] in forbidden)
    assert not bad, "; ".join(bad)


def test_one_target_never_imports_another(graph):
    bad = sorted(f"{m} imports {d}" for m, deps in graph.items() if m.startswith(("targets.gke", "targets.vertex"))
                 for d in deps if d.startswith(("targets.gke", "targets.vertex"))
                 and d.split(".")[1] != m.split(".")[1])
    assert not bad, "; ".join(bad)


def test_the_sandboxs_import_circles_stay_inside_one_component():
    """The sandbox is not product code; its circles (engines: runtime <-> the engine handlers; kube: the
    cluster <-> its controllers; gke: the service <-> its mixins) are each one emulator's inside, commented
    in that package's __init__.py. A circle across two emulators would tie them together: it fails here."""
    modules = _modules(("sandbox",))
    graph = {m: imports_of(m, modules) for m in modules}
    across = [c for c in cycles(graph) if len({".".join(m.split(".")[:2]) for m in c}) > 1]
    assert not across, "; ".join(" <-> ".join(c) for c in across)
    for component in {".".join(m.split(".")[:2]) for c in cycles(graph) for m in c}:
        init = ROOT / component.replace(".", "/") / "__init__.py"
        assert "Import circle, on purpose" in init.read_text(), f"say why {component} imports itself in a circle"


def _third_party(module: str, modules: dict[str, Path] | None = None) -> set[str]:
    path = (MODULES if modules is None else modules)[module]
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_the_pure_core_does_no_io_and_nothing_product_imports_the_sandbox():
    io = {"prefect", "kubernetes", "google", "httpx", "requests", "slack_sdk", "huggingface_hub", "aiohttp"}
    bad = sorted(f"{m} imports {sorted(_third_party(m) & io)}" for m in MODULES
                 if m.startswith("manifests") and _third_party(m) & io)
    bad += sorted(f"{m} imports the sandbox" for m in MODULES
                  if m.split(".")[0] in ("flows", "targets", "tasks", "manifests", "servers") and "sandbox" in _third_party(m))
    assert not bad, "; ".join(bad)
