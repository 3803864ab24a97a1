"""`llm-fleet` command line: validate and render specs, run the sandbox, run the flows."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from manifests.spec import SpecError, load_spec


def _validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            spec = load_spec(path)
        except SpecError as exc:
            print(f"✗ {exc}", file=sys.stderr)
            failed += 1
            continue
        gpus = (" → ".join(o.label() for o in spec.capacity_options) if spec.capacity else
                f"{spec.accelerator.count}× {spec.accelerator.type}{' spot' if spec.accelerator.spot else ''}")
        print(f"✓ {path}: {spec.name} — {spec.model.id} on {spec.engine.kind}, {gpus}, "
              f"{spec.target}{'' if spec.target != 'gke' else ' ' + spec.cluster.mode}")
        for warning in spec.warnings:
            print(f"  ⚠ {warning}")
    return 1 if failed else 0


def _render(args: argparse.Namespace) -> int:
    from manifests.render import render

    try:
        spec = load_spec(args.file)
        objs = render(spec, color=args.color, revision=args.revision)
    except SpecError as exc:
        print(f"✗ {exc}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objs, sys.stdout, sort_keys=False)
    return 0


def _sandbox(args: argparse.Namespace) -> int:
    from sandbox.app import main as sandbox_main

    argv = ["--time-scale", str(args.time_scale)]
    if args.state_dir:
        argv += ["--state-dir", str(args.state_dir)]
    return sandbox_main(argv) or 0


def _demo(args: argparse.Namespace) -> int:
    from llm_fleet.demo import main as demo_main

    return demo_main(args)


def _webhook(args: argparse.Namespace) -> int:
    from servers.webhook import main as webhook_main

    return webhook_main(host=args.host, port=args.port, specs=args.spec, secret_block=args.secret_block)


def _schedules(args: argparse.Namespace) -> int:
    from flows.park import sync_schedules

    rows = sync_schedules(specs=[str(f) for f in args.spec])
    for r in rows:
        print(f"{r['action']:<9} {r['deployment']:<20} {r['schedule']:<40} {r['cron']:<16} {r['timezone']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-fleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check model-deployment specs; one clear error per bad file")
    p.add_argument("files", nargs="+", type=Path, help="spec files, e.g. deployments/*.yaml")
    p.set_defaults(func=_validate)

    p = sub.add_parser("render", help="print the Kubernetes objects of a spec as a YAML stream")
    p.add_argument("file", type=Path, help="a spec file, e.g. deployments/gemma2-2b-it-vllm-l4.yaml")
    p.add_argument("--color", choices=["blue", "green"], default="blue",
                   help="which color's Deployment the live Service selects (default: blue)")
    p.add_argument("--revision", help="model revision (commit) to pin; default: the spec's")
    p.set_defaults(func=_render)

    p = sub.add_parser("sandbox", help="the loopback GKE/Compute/Kubernetes/HF/Slack emulators")
    sp = p.add_subparsers(dest="sandbox_command", required=True)
    up = sp.add_parser("up", help="start the sandbox and write <state-dir>/env and kubeconfig")
    up.add_argument("--state-dir", type=Path, default=Path(".sandbox"),
                    help="where the env file, kubeconfig and gcloud config are written (default: .sandbox)")
    up.add_argument("--time-scale", type=float, default=1.0,
                    help="multiply cloud delays (cluster create, node boot, weight load); 0.01 = 100× faster")
    up.set_defaults(func=_sandbox)

    p = sub.add_parser("demo", help="the main job: sandbox + Prefect server + flows, a whole lifecycle",
                       description="Starts the sandbox, a Prefect server (UI) and a worker on 127.0.0.1, deploys "
                       "the flows and runs a model's lifecycle through them. Needs nothing but this "
                       "checkout; with kubectl and gcloud on PATH it also shows the result through them. "
                       "Every process it started is stopped when it exits (also on Ctrl-C or SIGTERM).")
    p.add_argument("--state-dir", type=Path, default=Path(".sandbox"),
                   help="scratch directory for the sandbox, Prefect's database and logs; emptied first "
                        "(default: .sandbox)")
    p.add_argument("--time-scale", type=float, default=0.02,
                   help="multiply cloud delays (cluster create, node boot, weight load); default 0.02 = 50× faster")
    p.add_argument("--spec", type=Path, default=Path("deployments/gemma2-2b-it-vllm-l4.yaml"),
                   help="the model-deployment spec to run (default: deployments/gemma2-2b-it-vllm-l4.yaml)")
    p.add_argument("--keep-running", action="store_true",
                   help="leave the Prefect server (UI) and sandbox up after the lifecycle, until Ctrl-C")
    p.add_argument("--park-idle", action="store_true",
                   help="keep park_idle's schedule on (default: paused, so a model you try after the demo is "
                        "not parked after its spec's idle_after)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("webhook", help="receive Hugging Face Hub repo webhooks; a push to a tracked branch "
                                       "emits llm-fleet.model.revision (secret: $LLM_FLEET_WEBHOOK_SECRET)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8787, help="port to listen on (default: 8787)")
    p.add_argument("--spec", type=Path, action="append", default=[],
                   help="a spec to map pushes to (repeatable; default: every spec under deployments/)")
    p.add_argument("--secret-block", help="read the secret from this Prefect Secret block instead of the env")
    p.set_defaults(func=_webhook)

    p = sub.add_parser("schedules", help="the specs' schedule.park / schedule.wake as Prefect deployment schedules")
    sp = p.add_subparsers(dest="schedules_command", required=True)
    sync = sp.add_parser("sync", help="create/update/delete park_model and wake_model schedules from the specs "
                                      "(wakes start early by the p95 wake time); needs PREFECT_API_URL")
    sync.add_argument("--spec", type=Path, action="append", default=[],
                      help="only this spec's schedules (repeatable; default: every spec under deployments/, "
                           "and schedules of removed specs are deleted)")
    sync.set_defaults(func=_schedules)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
