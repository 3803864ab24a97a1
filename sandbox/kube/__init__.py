"""A Kubernetes API server for the sandbox: real kubectl and the kubernetes python client talk to it.

See :class:`KubeCluster`.
"""

# Import circle, on purpose and inside this component only: KubeCluster (cluster.py) assembles the API
# server, admission and the controllers, and they import the cluster back for its store and clock (one API
# server split by area). tests/unit/test_imports.py checks no circle leaves a sandbox component.

from sandbox.kube.cluster import KubeCluster

__all__ = ["KubeCluster"]
