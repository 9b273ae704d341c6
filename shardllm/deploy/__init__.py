"""Deployment manifests: `shardllm deploy kubernetes` renders Kubernetes objects from serve's own flags.

`kubernetes.py` holds the spec and the one-node objects (Deployment, Service, PVC, ServiceMonitor);
`multinode.py` the Ray ones (a LeaderWorkerSet, or a KubeRay RayCluster). Plain dicts, no client library.
"""

from shardllm.deploy.kubernetes import DeploySpec, render

__all__ = ["DeploySpec", "render"]
