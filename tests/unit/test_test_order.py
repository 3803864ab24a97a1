"""The suite's own scheduling (tests/conftest.py): modules start longest first, and a worker busy with a long
test queues the shortest module behind it, not the next-longest."""

from __future__ import annotations

import json
import types

import pytest

import tests.conftest as suite

DURATIONS = {"m/test_demo.py": 200.0, "m/test_release.py": 60.0, "m/test_gateway.py": 50.0,
             "m/test_park.py": 40.0, "m/test_kube.py": 15.0, "m/test_unit.py": 0.5}
TESTS = {"m/test_demo.py": 1, "m/test_release.py": 19, "m/test_gateway.py": 4, "m/test_park.py": 11,
         "m/test_kube.py": 27, "m/test_unit.py": 30}


@pytest.fixture
def durations(tmp_path, monkeypatch):
    path = tmp_path / "durations.json"
    path.write_text(json.dumps(DURATIONS))
    monkeypatch.setattr(suite, "DURATIONS", path)
    return path


class _Item:
    def __init__(self, nodeid: str, long: bool = False) -> None:
        self.nodeid, self._long = nodeid, long

    def get_closest_marker(self, name: str):
        return object() if name == "long" and self._long else None


def test_modules_start_longest_first_each_in_one_piece_its_long_tests_first(durations):
    items = [_Item(f"{m}::t{i}", long=(m == "m/test_kube.py" and i == 1)) for m in sorted(TESTS) for i in range(2)]
    items.append(_Item("m/test_new.py::t0"))  # not measured yet: the median (45 s)
    suite.pytest_collection_modifyitems(None, items)
    modules = [i.nodeid.partition("::")[0] for i in items]
    assert list(dict.fromkeys(modules)) == ["m/test_demo.py", "m/test_release.py", "m/test_gateway.py",
                                            "m/test_new.py", "m/test_park.py", "m/test_kube.py", "m/test_unit.py"]
    assert [i.nodeid for i in items if i.nodeid.startswith("m/test_kube.py")] == ["m/test_kube.py::t1",
                                                                                 "m/test_kube.py::t0"]
    assert all(modules[i] == modules[i + 1] or modules[i + 1] not in modules[:i + 1] for i in range(len(modules) - 1))


def _schedule(nodes: int) -> list[list[str]]:
    """The modules each of ``nodes`` workers is given when the run starts, in order."""
    order = sorted(TESTS, key=lambda m: -DURATIONS[m])
    collection = [f"{m}::t{i}" for m in order for i in range(TESTS[m])]
    config = types.SimpleNamespace(getvalue=lambda name: "loadfile",
                                   option=types.SimpleNamespace(loadscopereorder=False, maxschedchunk=None),
                                   getoption=lambda *a, **k: None)
    log = types.SimpleNamespace(loadfilesched=lambda *a: None, loadscopesched=lambda *a: None)
    sched = suite.pytest_xdist_make_scheduler(config, log)
    sched.numnodes = nodes

    class Node:
        def __init__(self, i: int) -> None:
            self.gateway, self.shutting_down, self.sent = types.SimpleNamespace(id=f"gw{i}"), False, []

        def send_runtest_some(self, indexes) -> None:
            self.sent += indexes

        def shutdown(self) -> None:
            self.shutting_down = True

    workers = [Node(i) for i in range(nodes)]
    for node in workers:
        sched.add_node(node)
        sched.add_node_collection(node, collection)
    sched.schedule()
    return [list(dict.fromkeys(collection[i].partition("::")[0] for i in node.sent)) for node in workers]


def test_a_worker_busy_with_the_demo_queues_the_shortest_module_not_the_next_longest(durations):
    given = _schedule(3)
    # xdist queues a second module behind a module of one or two tests: behind the demo, the shortest one
    assert given[0] == ["m/test_demo.py", "m/test_unit.py"]
    assert given[1] == ["m/test_release.py"] and given[2] == ["m/test_gateway.py"]
