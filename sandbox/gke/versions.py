"""GKE versions and release channels: ``projects.locations.getServerConfig`` (valid master and node
versions, image types, the RAPID / REGULAR / STABLE channels with their default and valid versions)
and how a requested version (``-`` or empty = the channel's default, ``latest``, a prefix such as
``1.32`` or a full ``1.32.6-gke.1013000``) resolves, as GKE resolves ``initialClusterVersion``,
``desiredMasterVersion``, ``desiredNodeVersion`` and a node pool's ``nodeVersion`` (unknown -> 400).
"""

from __future__ import annotations

import re
from typing import Any

from google.cloud import container_v1

from sandbox.gke.common import _bad, to_dict

# The 1.28-1.30 lines as defaults: each cluster's API server reports the version GKE shows here (its
# /version, every kubelet), and gcloud's kubectl dispatcher runs the kubectl of that minor -- 1.31+ send
# protobuf bodies this JSON-only API server cannot read (docs/sandbox-contract.md, "Versions"). One 1.33
# patch (a Rapid release of January 2026), never a default, for what needs it (fast-starting nodes, Autopilot
# ComputeClasses in Standard): the product's Python clients reach such a cluster, its kubectl.1.33 only for
# the kinds whose protobuf bodies the sandbox reads (sandbox/kube/protobuf.py).
VERSIONS = [
    "1.33.5-gke.2019000", "1.30.14-gke.1009000", "1.30.12-gke.1086000", "1.30.5-gke.1014001", "1.29.15-gke.1325000",
    "1.29.10-gke.1280000", "1.28.15-gke.1020000",
]


CHANNELS: dict[str, tuple[str, list[str]]] = {
    "RAPID": ("1.30.14-gke.1009000", ["1.33.5-gke.2019000", "1.30.14-gke.1009000", "1.30.12-gke.1086000"]),
    "REGULAR": ("1.30.5-gke.1014001", ["1.30.12-gke.1086000", "1.30.5-gke.1014001", "1.29.15-gke.1325000"]),
    "STABLE": ("1.29.15-gke.1325000", ["1.30.5-gke.1014001", "1.29.15-gke.1325000", "1.29.10-gke.1280000",
                                       "1.28.15-gke.1020000"]),
}


DEFAULT_CHANNEL = "REGULAR"


IMAGE_TYPES = ["COS_CONTAINERD", "UBUNTU_CONTAINERD", "WINDOWS_LTSC_CONTAINERD"]


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


class VersionsMixin:
    """Version resolution and ``serverConfig`` (a part of :class:`~sandbox.gke.service.Gke`)."""

    def _resolve_version(self, requested: str | None, channel: str | None) -> str:
        valid = CHANNELS[channel][1] if channel in CHANNELS else VERSIONS
        default = CHANNELS[channel or DEFAULT_CHANNEL][0] if (channel or DEFAULT_CHANNEL) in CHANNELS else \
            CHANNELS[DEFAULT_CHANNEL][0]
        if not requested or requested == "-":
            return default
        if requested == "latest":
            return max(valid, key=_version_key)
        matches = [v for v in valid if v == requested or v.startswith(requested + ".") or
                   v.startswith(requested + "-")]
        if not matches:
            where = f" in channel {channel}" if channel in CHANNELS else ""
            raise _bad(f"Master version \"{requested}\" is unsupported{where}.")
        return max(matches, key=_version_key)

    def server_config(self, project: str, location: str) -> dict[str, Any]:
        msg = container_v1.ServerConfig(
            default_cluster_version=CHANNELS[DEFAULT_CHANNEL][0],
            valid_node_versions=VERSIONS, valid_master_versions=VERSIONS,
            default_image_type="COS_CONTAINERD", valid_image_types=IMAGE_TYPES,
            channels=[container_v1.ServerConfig.ReleaseChannelConfig(
                channel=container_v1.ReleaseChannel.Channel[ch], default_version=default,
                valid_versions=valid, upgrade_target_version=valid[0]) for ch, (default, valid) in CHANNELS.items()],
        )
        return to_dict(container_v1.ServerConfig, msg)
