"""The suite's own scheduling (tests/conftest.py): modules start longest first, a worker busy with a long
test queues the shortest module behind it, not the next-longest, and on a machine with fewer cores than
workers, one lane runs the modules that mostly wait."""

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


def _schedule(nodes: int, *, until_done: bool = False, seconds: dict[str, float] = DURATIONS,
              tests: dict[str, int] = TESTS) -> list[list[str]]:
    """The modules each of ``nodes`` workers is given when the run starts (or, ``until_done``, in the whole
    run, each test taking its module's time over its number of tests), in order."""
    order = sorted(tests, key=lambda m: -seconds[m])
    collection = [f"{m}::t{i}" for m in order for i in range(tests[m])]
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
    clock, done = dict.fromkeys(workers, 0.0), dict.fromkeys(workers, 0)
    while until_done and (busy := [w for w in workers if done[w] < len(w.sent)]):
        node = min(busy, key=clock.get)  # the worker whose current test ends first
        index = node.sent[done[node]]
        done[node] += 1
        module = collection[index].partition("::")[0]
        clock[node] += seconds[module] / tests[module]
        sched.mark_test_complete(node, index)
    return [list(dict.fromkeys(collection[i].partition("::")[0] for i in node.sent)) for node in workers]


def test_a_worker_busy_with_the_demo_queues_the_shortest_module_not_the_next_longest(durations):
    given = _schedule(3)
    # xdist queues a second module behind a module of one or two tests: behind the demo, the shortest one
    assert given[0] == ["m/test_demo.py", "m/test_unit.py"]
    assert given[1] == ["m/test_release.py"] and given[2] == ["m/test_gateway.py"]


def test_with_more_workers_than_cores_one_lane_runs_the_modules_that_mostly_wait(tmp_path, monkeypatch):
    """Four workers on two cores: three run the CPU-heavy modules, the fourth the least CPU-hungry ones (CPU-s
    per second measured), about a worker's share, so the CPU-heavy ones never run four at a time and the run
    does not end on modules that only wait. With a core more there is no such lane: longest first, as before."""
    measured = {"m/test_demo.py": (200.0, 180.0), "m/test_release.py": (60.0, 50.0), "m/test_park.py": (50.0, 40.0),
                "m/test_stream.py": (45.0, 4.0), "m/test_gateway.py": (40.0, 35.0), "m/test_kube.py": (15.0, 3.0),
                "m/test_flow.py": (12.0, 10.0), "m/test_unit.py": (0.5, 0.5)}
    seconds = {m: s for m, (s, _) in measured.items()}
    tests = {"m/test_demo.py": 1, "m/test_release.py": 19, "m/test_park.py": 11, "m/test_stream.py": 3,
             "m/test_gateway.py": 4, "m/test_kube.py": 27, "m/test_flow.py": 5, "m/test_unit.py": 30}
    path = tmp_path / "durations.json"
    path.write_text(json.dumps({m: {"seconds": s, "cpu": c} for m, (s, c) in measured.items()}))
    monkeypatch.setattr(suite, "DURATIONS", path)
    monkeypatch.setattr(suite.os, "cpu_count", lambda: 2)
    given = _schedule(4, until_done=True, seconds=seconds, tests=tests)
    # 0.09 and 0.2 CPU-s a second, 60 s of the run's 422.5 / 4
    assert given[3] == ["m/test_stream.py", "m/test_kube.py"]
    assert [g[0] for g in given[:3]] == ["m/test_demo.py", "m/test_release.py", "m/test_park.py"]
    assert sorted(m for g in given[:3] for m in g) == ["m/test_demo.py", "m/test_flow.py", "m/test_gateway.py",
                                                       "m/test_park.py", "m/test_release.py", "m/test_unit.py"]
    monkeypatch.setattr(suite.os, "cpu_count", lambda: 3)  # as many heavy lanes as workers: longest first
    assert _schedule(4, until_done=True, seconds=seconds, tests=tests)[3] == ["m/test_stream.py", "m/test_gateway.py"]


def test_no_worker_starts_a_prefect_server_the_heavy_lanes_do_not_need(tmp_path, monkeypatch):
    """Each worker that runs a module using the flow tests' Prefect server starts one (~6 CPU-s and a
    PostgreSQL). Once the CPU-heavy lanes' number of workers have one, a worker without one is given the
    modules that need none while there are some (which modules need one: the workers' collection, a file)."""
    measured = {"m/test_demo.py": (30.0, 27.0), "m/test_release.py": (60.0, 50.0), "m/test_park.py": (50.0, 40.0),
                "m/test_stream.py": (45.0, 4.0), "m/test_gateway.py": (40.0, 35.0), "m/test_unit.py": (20.0, 18.0),
                "m/test_kube.py": (15.0, 3.0), "m/test_flow.py": (12.0, 10.0), "m/test_lightflow.py": (10.0, 1.5)}
    tests = {"m/test_demo.py": 1, "m/test_release.py": 19, "m/test_park.py": 11, "m/test_stream.py": 3,
             "m/test_gateway.py": 4, "m/test_unit.py": 30, "m/test_kube.py": 27, "m/test_flow.py": 5,
             "m/test_lightflow.py": 3}
    seconds = {m: s for m, (s, _) in measured.items()}
    serving = {"m/test_release.py", "m/test_park.py", "m/test_gateway.py", "m/test_flow.py", "m/test_lightflow.py"}
    path = tmp_path / "durations.json"
    path.write_text(json.dumps({m: {"seconds": s, "cpu": c} for m, (s, c) in measured.items()}))
    monkeypatch.setattr(suite, "DURATIONS", path)
    monkeypatch.setattr(suite.os, "cpu_count", lambda: 2)
    listed = tmp_path / "tests-prefect-modules.json"
    monkeypatch.setattr(suite, "_server_modules_file", lambda: listed)
    listed.write_text(json.dumps(sorted(serving)))
    given = _schedule(4, until_done=True, seconds=seconds, tests=tests)
    assert sum(bool(serving & set(g)) for g in given) == 3, given
    assert sorted(m for g in given for m in g) == sorted(tests)  # every module still ran
    listed.unlink()  # not known: as before, the waiting lane's worker starts a fourth
    assert sum(bool(serving & set(g)) for g in _schedule(4, until_done=True, seconds=seconds, tests=tests)) == 4
