"""Files that hold credentials or point at them (kubeconfigs): private to the user, removed on teardown.

A kubeconfig names a cluster's endpoint and CA and how to get a token; the sandbox and in-cluster
runs may put a bearer token in it. Either way it is written 0600 in a 0700 directory, atomically
(a concurrent reader never sees half a file), and teardown removes it with the cluster. A cluster's CA
(public, but what the client trusts) is a file beside them, one per CA named by its hash, written once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path

from tasks.settings import Settings, get_settings


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` as 0600 (its directory 0700), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(PermissionError):  # a shared parent we do not own stays as it is
        os.chmod(path.parent, 0o700)
    # Per thread too: deploy_fleet's concurrent subflows write one cluster's kubeconfig at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file left by a crashed run
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)
    return path


def kubeconfig_path(*, project: str, location: str, cluster: str, settings: Settings | None = None) -> Path:
    s = settings or get_settings()
    return s.kube_dir / f"{project}_{location}_{cluster}.yaml"


def _ca_name(ca_pem: bytes) -> str:
    return f"ca-{hashlib.sha256(ca_pem).hexdigest()[:32]}.crt"


def ca_file(ca_pem: bytes, *, settings: Settings | None = None) -> Path:
    """The CA bundle as a file for urllib3 (it reads a CA from a file only): ``ca-<sha256>.crt`` in the
    credentials directory, 0600, written once per CA (every client of a cluster, every process, reuses it)."""
    path = (settings or get_settings()).kube_dir / _ca_name(ca_pem)
    try:
        if path.read_bytes() == ca_pem and path.stat().st_mode & 0o777 == 0o600:
            return path
    except OSError:
        pass
    return write_private(path, ca_pem.decode("ascii"))


def cluster_credential_files(*, project: str, location: str, cluster: str,
                             settings: Settings | None = None) -> list[Path]:
    """Every file the product wrote for one cluster: its kubeconfig, any leftover temp copy, and its CA file
    unless another cluster's kubeconfig trusts the same CA."""
    path = kubeconfig_path(project=project, location=location, cluster=cluster, settings=settings or get_settings())
    others = set().union(*(_ca_names(p) for p in path.parent.glob("*.yaml") if p != path))
    cas = [path.parent / name for name in _ca_names(path) - others]
    return [path, path.with_suffix(".tmp"), *path.parent.glob(f".{path.name}.*.tmp"), *cas]


def _ca_names(kubeconfig: Path) -> set[str]:
    """The CA files a kubeconfig's clients use (see ca_file)."""
    import base64

    import yaml

    from manifests import yamlio

    try:
        config = yamlio.load(kubeconfig.read_text())
    except (OSError, yaml.YAMLError):
        return set()
    if not isinstance(config, dict):
        return set()
    return {_ca_name(base64.b64decode(data)) for c in config.get("clusters") or []
            if (data := (c.get("cluster") or {}).get("certificate-authority-data"))}


def remove_cluster_credentials(*, project: str, location: str, cluster: str,
                               settings: Settings | None = None) -> list[str]:
    """For teardown: delete the cluster's kubeconfig (and temp copies); returns what was removed."""
    removed = []
    for path in cluster_credential_files(project=project, location=location, cluster=cluster, settings=settings):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(str(path))
    return removed
