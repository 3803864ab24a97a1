"""GKE mirror_model: the image's Artifact Registry remote repository (``startup.image.mirror:
artifact-registry``) and a copy of a Hub revision's files once into the bucket the engine loads from
(``startup.weights: {source: gcs, bucket: ...}``), resumable and idempotent.

0. The image: get-or-create the remote repository the pods pull through (nothing is copied: the first pull
   fetches the image from its registry and the repository caches it; ``manifests/startup.py`` says why)
1. Check the spec's fields (startup.weights.source gcs, a bucket) and resolve the revision to its commit
2. List the commit's files on the Hub (size, sha256 of each LFS file, git blob id of the others)
3. List the mirror ``gs://BUCKET/PREFIX/ORG/NAME/COMMIT/`` and plan: a file whose object has its size and
   checksum is done (a rerun after a kill skips it); the others are copied
4. Copy each, streaming from the Hub into a resumable upload, checked against the Hub's checksum before
   the last chunk and against Cloud Storage's crc32c/md5 after
5. Verify: list the mirror again; every file there with its size and checksum
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import SecretStr

from manifests import mirror, startup
from manifests.spec import DeploymentSpec, SpecError, resolve_gke_spec, with_revision
from tasks import artifact_registry, hf
from tasks.log import logger
from tasks.report import Report, artifact_key
from tasks.weights_mirror import (
    CHUNK_BYTES,
    MirrorError,
    bucket_bindings,
    copy_file,
    forget_upload,
    mirrored_objects,
    revision_files,
)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def copy_revision(*, model_id: str, commit: str, token: SecretStr | None, project: str, bucket: str, prefix: str,
                  chunk_bytes: int = CHUNK_BYTES, on_chunk: Callable[[int], None] | None = None,
                  log: Callable[[str], None] = lambda _: None) -> tuple[mirror.MirrorPlan, list[mirror.SourceFile]]:
    """Steps 2-4 without Prefect state (what a killed run left is read from the bucket, not remembered):
    returns the plan it followed and the files it copied."""
    files = revision_files(model_id=model_id, commit=commit, token=token)
    objects = mirrored_objects(project=project, bucket=bucket, prefix=prefix)
    plan = mirror.plan(files, objects, prefix=prefix)
    for f in plan.done:  # an upload killed after its last chunk left its session's file behind
        forget_upload(bucket=bucket, name=prefix + f.path, checksum=f.checksum)
    copied = []
    for f in plan.copy:
        old = objects.get(prefix + f.path)
        copy_file(model_id=model_id, commit=commit, token=token, file=f, project=project, bucket=bucket,
                  name=prefix + f.path, replaces=old.generation if old else None, chunk_bytes=chunk_bytes,
                  on_chunk=on_chunk)
        copied.append(f)
        log(f"copied {f.path} ({_mib(f.size)}, {f.checksum[:19]}…)")
    return plan, copied


def ensure_image_repository(spec: DeploymentSpec, *, report: Report, dry_run: bool = False) -> dict[str, Any] | None:
    """Step 0: the image's remote repository exists (created once; a rerun finds it). None without the mirror."""
    repo = startup.image_repository(spec)
    if repo is None:
        return None
    with report.step(f"Image mirror {repo.registry} (Artifact Registry remote repository of {repo.upstream})") as step:
        if dry_run:
            live = artifact_registry.get_repository(repo=repo)
            step.detail = "exists" if live else "dry run: would be created"
            return {"repository": repo.registry, "image": startup.image_ref(spec), "created": False}
        live, created = artifact_registry.ensure_repository(repo=repo)
        step.detail = (f"{'created' if created else 'exists'} ({live.get('mode')}); the pods pull "
                       f"{startup.image_ref(spec)}, cached on the first pull")
    return {"repository": repo.registry, "image": startup.image_ref(spec), "created": created}


def ensure_mirror(spec: DeploymentSpec, *, commit: str, token: SecretStr, report: Report,
                  dry_run: bool = False) -> None:
    """deploy_model/release_model with ``startup.image.mirror: artifact-registry`` and/or
    ``startup.weights.source: gcs``: the pods will pull the image through its repository and load
    ``gs://…/COMMIT/``, so a missing repository is created and a missing or partial mirror copied first —
    after the Hub preflight, before anything is created (a missing bucket fails here, naming
    startup.weights.bucket)."""
    ensure_image_repository(spec, report=report, dry_run=dry_run)
    if spec.startup.weights.source != "gcs":
        return
    bucket, prefix = mirror.location(spec, commit)
    with report.step(f"Weights mirror gs://{bucket}/{prefix} (copy what is missing)") as step:
        if dry_run:
            files = revision_files(model_id=spec.model.id, commit=commit, token=token)
            plan = mirror.plan(files, mirrored_objects(project=spec.cluster.project, bucket=bucket, prefix=prefix),
                               prefix=prefix)
            step.detail = f"dry run: {len(plan.copy)} of {len(files)} files would be copied ({_mib(plan.bytes_to_copy)})"
        else:
            plan, copied = copy_revision(model_id=spec.model.id, commit=commit, token=token,
                                         project=spec.cluster.project, bucket=bucket, prefix=prefix, log=logger().info)
            total = len(plan.copy) + len(plan.done)
            step.detail = (f"{len(copied)} of {total} files copied now ({_mib(sum(f.size for f in copied))}), "
                           "verified" if copied else f"{total} files, already mirrored")
    warning = pods_read_warning(spec, bucket_bindings(project=spec.cluster.project, bucket=bucket))
    if warning:
        report.note(warning)


def pods_read_warning(spec: DeploymentSpec, bindings: list[dict] | None) -> str | None:
    """A warning when the bucket's own policy does not let the pods read the mirror (a project-level grant,
    invisible here, may still: so it does not fail the run)."""
    member, fix = mirror.pod_identity(spec)
    bucket = spec.startup.weights.bucket
    if bindings is None:
        return (f"⚠️ startup.weights.bucket: cannot read gs://{bucket}'s IAM policy to check that the pods "
                f"({member}) may read the weights — if they may not: {fix}")
    if not mirror.pods_can_read(bindings, spec):
        return (f"⚠️ startup.weights.bucket: gs://{bucket} grants no object read to the pods ({member}); unless a "
                f"project-level role does, the engine cannot load the weights — {fix}")
    return None


def mirror_model(spec: Any, *, revision: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """The mirror_model flow's body on GKE (see the module docstring)."""
    spec = with_revision(resolve_gke_spec(spec, flow="mirror_model"), revision)
    mirror.check(spec, SpecError)
    project = spec.cluster.project
    report = Report("mirror_model", f"{spec.model.id}@{spec.model.revision} ({spec.name})", spec.slack_channel)
    key = artifact_key("mirror-model", spec.name)
    with report.run(f"{key}-run"):
        if spec.startup.weights.source != "gcs":  # the image's mirror only
            image = ensure_image_repository(spec, report=report, dry_run=dry_run)
            what = f"{image['repository']} {'created' if image['created'] else 'exists'}"
            report.succeed(f"{'dry run: ' if dry_run else ''}{what}; weights from {spec.startup.weights.source}")
            return {"dry_run": dry_run, "image": image}
        with report.step("Resolve the revision") as step:
            token = hf.read_hf_token(block=spec.secret.prefect_block)
            commit = hf.get_model(model_id=spec.model.id, revision=spec.model.revision, token=token).sha
            bucket, prefix = mirror.location(spec, commit)
            step.detail = f"{spec.model.revision} is {commit[:12]} → gs://{bucket}/{prefix}"
        with report.step("Compare the Hub's files with the mirror") as step:
            files = revision_files(model_id=spec.model.id, commit=commit, token=token)
            plan = mirror.plan(files, mirrored_objects(project=project, bucket=bucket, prefix=prefix), prefix=prefix)
            step.detail = (f"{len(files)} files; {len(plan.done)} already mirrored, {len(plan.copy)} to copy "
                           f"({_mib(plan.bytes_to_copy)})")
        image = ensure_image_repository(spec, report=report, dry_run=dry_run)  # once the bucket is known good
        rows = [{"file": f.path, "bytes": f.size, "checksum": f.checksum,
                 "action": "copy" if f in plan.copy else "already mirrored"} for f in files]
        if dry_run:
            report.table_artifact(f"{key}-plan", rows, f"What mirror_model of {spec.model.id}@{commit[:12]} would copy")
            report.succeed(f"dry run, nothing copied: {len(plan.copy)} of {len(files)} files to copy")
            return {"dry_run": True, "commit": commit, "uri": f"gs://{bucket}/{prefix}", "plan": rows, "image": image}
        with report.step("Copy the missing files (streaming, resumable, checked)") as step:
            _, copied = copy_revision(model_id=spec.model.id, commit=commit, token=token, project=project,
                                      bucket=bucket, prefix=prefix, log=logger().info)
            step.detail = f"{len(copied)} copied ({_mib(sum(f.size for f in copied))})" if copied else "nothing to copy"
        with report.step("Verify the mirror") as step:
            after = mirror.plan(files, mirrored_objects(project=project, bucket=bucket, prefix=prefix), prefix=prefix)
            if after.copy:
                raise MirrorError(f"not mirrored after the copy: {', '.join(f.path for f in after.copy)}",
                                  "rerun mirror_model")
            step.detail = f"{len(after.done)} files, sizes and checksums as the Hub states"
        warning = pods_read_warning(spec, bucket_bindings(project=project, bucket=bucket))
        if warning:
            report.note(warning)
        report.table_artifact(key, rows, f"Mirror of {spec.model.id}@{commit[:12]} in gs://{bucket}/{prefix}")
        report.succeed(f"gs://{bucket}/{prefix}: {len(files)} files, {len(copied)} copied now")
        return {"commit": commit, "uri": f"gs://{bucket}/{prefix}", "files": len(files),
                "copied": [f.path for f in copied], "skipped": [f.path for f in plan.done], "image": image}
