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


def test_a_cluster_ca_is_one_private_file_per_ca_written_once(tmp_path):
    """Issue 18.4: the CA urllib3 needs as a file is ca-<hash>.crt beside the kubeconfigs, 0600, written once
    (before: a new llm-fleet-ca-*.crt in the temp dir per client, never removed)."""
    from tasks.credfiles import ca_file

    s = Settings(kube_dir=tmp_path / "kube")
    ca = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    path = ca_file(ca, settings=s)
    assert path.parent == s.kube_dir and path.name.startswith("ca-") and path.read_bytes() == ca
    assert mode(path) == 0o600
    before = path.stat().st_mtime_ns, path.stat().st_ino
    assert ca_file(ca, settings=s) == path and (path.stat().st_mtime_ns, path.stat().st_ino) == before
    other = ca_file(ca.replace(b"MIIB", b"MIIC"), settings=s)
    assert other != path and sorted(p.name for p in s.kube_dir.iterdir()) == sorted([path.name, other.name])


def test_kube_clients_of_one_cluster_share_its_ca_file_and_leave_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    import base64
    import tempfile

    import yaml

    from tasks import clients, credfiles

    s = Settings(kube_dir=tmp_path / "kube")
    monkeypatch.setattr(credfiles, "get_settings", lambda: s)
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
              "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1", "certificate-authority-data": ca}}],
              "users": [{"name": "u", "user": {"token": "t"}}], "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}
    tmp = set(os.listdir(tempfile.gettempdir()))
    paths = []
    for i in range(3):  # three processes' (or mtimes') clients of the same cluster
        kubeconfig = tmp_path / f"k{i}.yaml"
        kubeconfig.write_text(yaml.safe_dump(config))
        paths.append(clients._kube_client(str(kubeconfig), i, "adc", "").configuration.ssl_ca_cert)
    assert len(set(paths)) == 1 and paths[0].startswith(str(s.kube_dir))
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - tmp if n.startswith("llm-fleet-ca-")]


def test_teardown_removes_a_clusters_ca_file_unless_another_cluster_trusts_the_same_ca(tmp_path):
    import base64

    from tasks.clients import write_kubeconfig
    from tasks.credfiles import ca_file

    s = Settings(kube_dir=tmp_path / "kube")
    mine, shared = b"-----BEGIN CERTIFICATE-----\nA\n", b"-----BEGIN CERTIFICATE-----\nB\n"
    for cluster, ca in (("a", mine), ("b", shared), ("c", shared)):
        write_kubeconfig(project="p", location="l", cluster=cluster, endpoint="1.2.3.4",
                         ca_cert_b64=base64.b64encode(ca).decode(), settings=s)
        ca_file(ca, settings=s)
    removed = remove_cluster_credentials(project="p", location="l", cluster="a", settings=s)
    assert str(ca_file(mine, settings=s)) in removed  # (written again by this call, for the next check)
    removed = remove_cluster_credentials(project="p", location="l", cluster="b", settings=s)
    assert not any("ca-" in r for r in removed)  # cluster c still trusts it
    removed = remove_cluster_credentials(project="p", location="l", cluster="c", settings=s)
    assert any("ca-" in r for r in removed)
    assert [p.name for p in s.kube_dir.iterdir()] == [ca_file(mine, settings=s).name]
