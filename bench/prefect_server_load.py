"""The benchmarks' Prefect server under concurrent flows: Prefect's plain SQLite harness, the benchmarks' own
(bench/_support.prefect_server: SQLite with the unread server services off, or PostgreSQL when installed).

One workload for each, each in a process of its own (a server's settings are read from the environment when
it starts): ``--threads`` threads each run ``--flows`` flows of ``--tasks`` tasks. Prints each server's wall
time and failed flow runs, and the ratios to the plain harness, from one run.

    uv run python bench/prefect_server_load.py [--threads 6] [--flows 6] [--tasks 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def workload(server: str, threads: int, flows: int, tasks: int) -> dict:
    """Run in a child process: the workload against one server kind."""
    import contextlib

    from prefect import flow, task

    @task
    def one(i: int) -> int:
        return i

    @flow
    def many(n: int) -> int:
        return sum(one(i) for i in range(n))

    failed: list[str] = []

    def work() -> None:
        for _ in range(flows):
            try:
                many(tasks)
            except Exception as exc:  # noqa: BLE001 - every failed flow run counts
                failed.append(type(exc).__name__)

    if server == "harness":
        from prefect.testing.utilities import prefect_test_harness

        ctx: contextlib.AbstractContextManager = prefect_test_harness(server_startup_timeout=120)
        database = "sqlite (prefect_test_harness, every service)"
    else:
        from bench._support import prefect_server

        ctx = prefect_server()
    with ctx as got:
        database = got or database
        start = time.monotonic()
        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        took = time.monotonic() - start
    return {"database": database, "seconds": round(took, 1), "failed": len(failed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--flows", type=int, default=6)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--child", choices=["harness", "sqlite", "postgres"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "ERROR"}
    if args.child:
        os.environ.update(env)
        print(json.dumps(workload(args.child, args.threads, args.flows, args.tasks)))
        return 0
    print(f"{args.threads} threads x {args.flows} flows x {args.tasks} tasks against each server", flush=True)
    rows = []
    for kind in ("harness", "sqlite", "postgres"):
        child = subprocess.run([sys.executable, __file__, "--child", kind, "--threads", str(args.threads),
                                "--flows", str(args.flows), "--tasks", str(args.tasks)], capture_output=True,
                               text=True, env={**env, "LLM_FLEET_TEST_DB": "sqlite" if kind == "sqlite" else "postgres"})
        try:
            row = json.loads(child.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            print(f"  {kind}: did not finish: {child.stderr[-500:]}")
            continue
        if kind == "postgres" and row["database"] != "postgres":
            print("  postgres: not installed here (skipped)")
            continue
        rows.append(row)
        print(f"  {row['database']}: {row['seconds']} s, {row['failed']} failed flow run(s)", flush=True)
    if rows:
        base = rows[0]["seconds"]
        print("ratios to the plain harness: " + ", ".join(f"{r['database'].split(' ')[0]} {r['seconds'] / base:.2f}"
                                                          for r in rows[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
