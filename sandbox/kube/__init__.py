"""A Kubernetes API server for the sandbox: real kubectl and the kubernetes python client talk to it.

See :class:`KubeCluster`.
"""

from sandbox.kube.cluster import KubeCluster

__all__ = ["KubeCluster"]
