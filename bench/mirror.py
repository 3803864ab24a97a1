"""mirror_model's copy, killed and rerun: what the rerun sends again, and what a complete mirror costs.

Starts the sandbox, adds a model of N MiB in 16 MiB shards to its Hub and a bucket to its Cloud Storage, then
(the flow's steps, no Prefect; 1 MiB chunks):

1. copies the revision once, whole (the throughput is the loopback's, not a cloud figure);
2. into a second bucket, copies again but stops the process's copy (an exception from its progress hook, as
   abrupt for the upload as a kill: no last chunk) halfway through the third shard, then reruns it;
3. reruns over the complete mirror.

Prints the bytes each run sent to Cloud Storage (the emulator's count, resent chunks included) and the ratio
of the rerun's bytes to what was left to copy — 1.00 means nothing already in the bucket was sent again
(a restart of the cut file from byte 0 would be 1 + its sent half ÷ the rest).

    uv run python bench/mirror.py [--mib 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20
SHARD = 16 * MIB


class Killed(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="model size in MiB (bf16 weights, 16 MiB shards)")
    args = ap.parse_args()

    from pydantic import SecretStr

    from bench._support import start_sandbox

    sb = start_sandbox(0.01)
    try:
        import targets.gke.mirror_steps as steps

        model = "sandbox-org/bench-mirror"
        commit = sb.hub.add_model(model, params=args.mib * MIB // 2, shard_bytes=SHARD)
        prefix = f"models/{model}/{commit}/"
        token = SecretStr("hf_sandbox_read")
        kw = {"model_id": model, "commit": commit, "token": token, "project": sb.project, "prefix": prefix,
              "chunk_bytes": MIB}

        def sent() -> int:
            return sb.gcs.bytes_received

        sb.gcs.add_bucket("bench-whole")
        t0, b0 = time.monotonic(), sent()
        plan, _ = steps.copy_revision(bucket="bench-whole", **kw)
        whole_s, whole_b = time.monotonic() - t0, sent() - b0
        total = sum(f.size for f in plan.copy)
        print(f"whole copy: {len(plan.copy)} files, {total / MIB:.1f} MiB sent {whole_b / MIB:.1f} MiB in "
              f"{whole_s:.2f} s ({total / MIB / whole_s:.0f} MiB/s on loopback, sha256+crc32c+md5 on the way)")

        shards = sorted((f for f in plan.copy if f.path.endswith(".safetensors")), key=lambda f: f.path)
        cut_file = shards[min(2, len(shards) - 1)]
        sb.gcs.add_bucket("bench-cut")
        real = steps.copy_file

        def copy_file(**k):
            if k["file"] == cut_file:
                def hook(pos: int) -> None:
                    if pos >= cut_file.size // 2:
                        raise Killed(pos)
                k["on_chunk"] = hook
            return real(**k)

        steps.copy_file = copy_file
        b0 = sent()
        try:
            steps.copy_revision(bucket="bench-cut", **kw)
        except Killed as exc:
            held = int(str(exc.args[0]))
        else:
            held = 0
        first_b = sent() - b0
        steps.copy_file = real
        left = total - sum(len(o.data) for o in sb.gcs.objects("bench-cut", prefix).values()) - held
        b0 = sent()
        steps.copy_revision(bucket="bench-cut", **kw)
        rerun_b = sent() - b0
        print(f"cut copy: stopped {held / MIB:.1f} MiB into {cut_file.path} after sending "
              f"{first_b / MIB:.1f} MiB; the rerun sent {rerun_b / MIB:.1f} MiB of the {left / MIB:.1f} MiB left "
              f"(ratio {rerun_b / max(left, 1):.2f}; restarting the cut file would be "
              f"{(left + held) / max(left, 1):.2f})")

        b0, sessions = sent(), len(sb.gcs.snapshot()["sessions"])
        t0 = time.monotonic()
        plan, copied = steps.copy_revision(bucket="bench-cut", **kw)
        print(f"complete mirror: rerun sent {(sent() - b0) / MIB:.1f} MiB, started "
              f"{len(sb.gcs.snapshot()['sessions']) - sessions} uploads, copied {len(copied)} of "
              f"{len(plan.done)} files in {time.monotonic() - t0:.2f} s (two listings)")
        ok = rerun_b == left and not copied
        print(f"mirror: rerun after a cut sends {rerun_b / max(left, 1):.2f} x what was left; a complete mirror "
              f"sends {(sent() - b0)} bytes")
        return 0 if ok else 1
    finally:
        sb.stop()


if __name__ == "__main__":
    raise SystemExit(main())
