"""Issue 13.7: kubeconfigs are written 0600 in a 0700 directory and removed by teardown."""

from __future__ import annotations

import os
import stat

from tasks.credfiles import remove_cluster_credentials, write_private
from tasks.settings import Settings


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_private_even_over_a_world_readable_leftover(tmp_path):
    s = Settings(kube_dir=tmp_path / "kube")
    from tasks.clients import write_kubeconfig

    leftover = s.kube_dir / ".p_l_c.yaml.1.tmp"
    s.kube_dir.mkdir(mode=0o755)
    leftover.write_text("old")
    os.chmod(leftover, 0o644)
    path = write_kubeconfig(project="p", location="l", cluster="c", endpoint="1.2.3.4", ca_cert_b64="", settings=s)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    again = write_private(path, "x")
    assert mode(again) == 0o600 and again.read_text() == "x"
    removed = remove_cluster_credentials(project="p", location="l", cluster="c", settings=s)
    assert str(path) in removed and str(leftover) in removed
    assert not list(s.kube_dir.iterdir())
    assert remove_cluster_credentials(project="p", location="l", cluster="c", settings=s) == []
