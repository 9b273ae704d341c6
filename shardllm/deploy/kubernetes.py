"""Kubernetes objects for `shardllm serve`: a spec, and the one-node Deployment + Service (+ PVC, ServiceMonitor).

Every object is a plain dict in the shape `kubectl apply` takes. The probe figures are ours; the layout
(Memory emptyDir on /dev/shm, GPU limits, a model cache volume, probes on /health) follows the
Kubernetes deployment pages of vLLM and LeaderWorkerSet (see ../shared/notes/ray-kubernetes.md, part B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
CACHE_MOUNT = "/cache"  # HF_HOME is CACHE_MOUNT/huggingface, as in the image (deploy/docker/Dockerfile)
CONFIG_MOUNT = "/etc/shardllm"
RUN_AS_USER = 2000  # the image's numeric non-root user (group 0)
HEALTH_PATH = "/health"
# Probe periods (s): readiness every 5, liveness every 10 with 3 misses; the startup probe holds both off
# until the model has loaded (startup_timeout, 30 min by default: a 70B checkpoint read from a cold volume).
STARTUP_PERIOD_S = 10
READINESS_PERIOD_S = 5
LIVENESS_PERIOD_S = 10
PROBE_FAILURES = 3
PROBE_TIMEOUT_S = 5
# The server gives running requests shutdown_timeout s after SIGTERM and uvicorn 5 s more (openai/run.py: run_server);
# the pod gets 15 s over that before the kubelet's SIGKILL.
TERMINATION_MARGIN_S = 15


@dataclass(frozen=True)
class DeploySpec:
    """What `shardllm deploy kubernetes` renders: the names, the serve argv, and the pod's needs.

    `serve_args` is the container's argv for `shardllm-serve` (it round-trips through serve's parser);
    `world_size` = tp x pp GPUs in all, spread evenly over `num_workers` pods (one per node).
    """

    name: str
    serve_args: list[str]
    world_size: int
    num_workers: int = 1
    namespace: str | None = None
    image: str = "shardllm:0.1.0"
    replicas: int = 1
    port: int = 8000
    shutdown_timeout: float = 30.0
    startup_timeout: int = 1800
    hf_token_secret: str | None = None  # NAME or NAME:KEY (key default "token")
    api_key_secret: str | None = None  # NAME or NAME:KEY
    cache_pvc: str | None = None  # an existing claim; None: render one (one node) or one per pod (LWS)
    cache_size: str = "500Gi"
    shm_size: str = "16Gi"
    service_monitor: bool = False
    ray_operator: str = "lws"  # lws | kuberay (num_workers > 1 only)
    ray_token_secret: str | None = None  # NAME or NAME:KEY: Ray token auth; None: RAY_AUTH_MODE=disabled
    config_yaml: str | None = None  # settings that have no serve flag, shipped as a ConfigMap
    cpu_only: bool = False  # `--device cpu`: the pods ask for no GPU
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def gpus_per_pod(self) -> int:
        return self.world_size // self.num_workers

    @property
    def selector(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": "shardllm", "app.kubernetes.io/instance": self.name}


def render(spec: DeploySpec) -> list[dict[str, Any]]:
    """The objects for `spec`, in apply order: one node (Deployment) or several (LeaderWorkerSet / RayCluster)."""
    if spec.num_workers > 1:
        from shardllm.deploy.multinode import render_kuberay, render_lws

        main = render_kuberay(spec) if spec.ray_operator == "kuberay" else render_lws(spec)
        objects = [*main[:-1], _config_map(spec), main[-1]]
    else:
        objects = [_cache_claim(spec), _config_map(spec), _deployment(spec)]
    objects.append(_service(spec))
    if spec.service_monitor:
        objects.append(_service_monitor(spec))
    return [o for o in objects if o is not None]


def metadata(spec: DeploySpec, name: str | None = None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name or spec.name}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    meta["labels"] = {**spec.selector, **spec.labels}
    meta.update(extra)
    return meta


def secret_env(env_name: str, ref: str, default_key: str) -> dict[str, Any]:
    secret, _, key = ref.partition(":")
    return {"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key or default_key}}}


def server_env(spec: DeploySpec) -> list[dict[str, Any]]:
    env = [{"name": "SHARDLLM_HOST", "value": "0.0.0.0"},  # probes and the Service reach the pod's IP
           {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"}]
    if spec.hf_token_secret:
        env.append(secret_env("HF_TOKEN", spec.hf_token_secret, "token"))
    if spec.api_key_secret:
        env.append(secret_env("SHARDLLM_API_KEY", spec.api_key_secret, "api_key"))
    return env


def probes(spec: DeploySpec) -> dict[str, Any]:
    """startup / readiness / liveness, all GET /health on the server's port (503 once the engine is dead)."""
    def get(period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": HEALTH_PATH, "port": "http"}, "periodSeconds": period,
                "timeoutSeconds": PROBE_TIMEOUT_S, "failureThreshold": failures}

    return {"startupProbe": get(STARTUP_PERIOD_S, math.ceil(spec.startup_timeout / STARTUP_PERIOD_S)),
            "readinessProbe": get(READINESS_PERIOD_S, PROBE_FAILURES),
            "livenessProbe": get(LIVENESS_PERIOD_S, PROBE_FAILURES)}


def gpu_resources(spec: DeploySpec) -> dict[str, Any]:
    if spec.cpu_only:
        return {}
    gpus = {GPU_RESOURCE: spec.gpus_per_pod}
    return {"limits": dict(gpus), "requests": dict(gpus)}


def volume_mounts(spec: DeploySpec) -> list[dict[str, Any]]:
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "cache", "mountPath": CACHE_MOUNT}]
    if spec.config_yaml is not None:
        mounts.append({"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True})
    return mounts


def volumes(spec: DeploySpec, cache_claim: str | None) -> list[dict[str, Any]]:
    """/dev/shm as RAM (NCCL's shared-memory transport; Docker's default is 64 MB), the cache, the config."""
    out: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
    if cache_claim:
        out.append({"name": "cache", "persistentVolumeClaim": {"claimName": cache_claim}})
    else:
        out.append({"name": "cache", "emptyDir": {}})
    if spec.config_yaml is not None:
        out.append({"name": "config", "configMap": {"name": f"{spec.name}-config"}})
    return out


def pod_spec(spec: DeploySpec, container: dict[str, Any], cache_claim: str | None) -> dict[str, Any]:
    container = {"name": container["name"], "image": spec.image, "imagePullPolicy": "IfNotPresent", **container,
                 "resources": gpu_resources(spec), "volumeMounts": volume_mounts(spec),
                 "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    if not container["resources"]:
        del container["resources"]
    return {"terminationGracePeriodSeconds": math.ceil(spec.shutdown_timeout) + 5 + TERMINATION_MARGIN_S,
            # Meets the "restricted" Pod Security Standard (non-root, no privilege escalation, no capabilities,
            # the runtime's seccomp profile); group 0 owns the image's HOME and cache.
            "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": 0, "fsGroup": 0,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container], "volumes": volumes(spec, cache_claim)}


def scrape_annotations(spec: DeploySpec) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(spec.port), "prometheus.io/path": "/metrics"}


def server_container(spec: DeploySpec) -> dict[str, Any]:
    """The container that runs `shardllm-serve` (the image's entrypoint) with the serve argv."""
    return {"name": "shardllm", "args": list(spec.serve_args), "env": server_env(spec),
            "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}], **probes(spec)}


def _cache_claim_name(spec: DeploySpec) -> str | None:
    if spec.cache_pvc:
        return spec.cache_pvc
    # A ReadWriteOnce claim binds to one node: several replicas get an emptyDir each (or pass --cache_pvc).
    return f"{spec.name}-cache" if spec.replicas == 1 else None


def cache_claim_spec(spec: DeploySpec) -> dict[str, Any]:
    return {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": spec.cache_size}}}


def _cache_claim(spec: DeploySpec) -> dict[str, Any] | None:
    if spec.cache_pvc or spec.replicas != 1:
        return None
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata(spec, f"{spec.name}-cache"),
            "spec": cache_claim_spec(spec)}


def _config_map(spec: DeploySpec) -> dict[str, Any] | None:
    if spec.config_yaml is None:
        return None
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(spec, f"{spec.name}-config"),
            "data": {"config.yaml": spec.config_yaml}}


def _deployment(spec: DeploySpec) -> dict[str, Any]:
    # One replica: Recreate, so the old pod frees its GPUs and its ReadWriteOnce cache before the new one starts.
    # Several: replace one at a time, never asking for GPUs beyond replicas x world size.
    strategy: dict[str, Any] = {"type": "Recreate"} if spec.replicas == 1 else {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(spec),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": spec.selector},
            "strategy": strategy,
            "progressDeadlineSeconds": spec.startup_timeout + 600,
            "template": {
                "metadata": {"labels": {**spec.selector, **spec.labels}, "annotations": scrape_annotations(spec)},
                "spec": pod_spec(spec, server_container(spec), _cache_claim_name(spec)),
            },
        },
    }


def service_selector(spec: DeploySpec) -> dict[str, str]:
    """The pods that serve HTTP: all of a Deployment's, the leader of each Ray group."""
    if spec.num_workers == 1:
        return spec.selector
    if spec.ray_operator == "kuberay":
        return {"ray.io/cluster": spec.name, "ray.io/node-type": "head"}
    return {**spec.selector, "leaderworkerset.sigs.k8s.io/worker-index": "0"}


def _service(spec: DeploySpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(spec),
            "spec": {"type": "ClusterIP", "selector": service_selector(spec),
                     "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}]}}


def _service_monitor(spec: DeploySpec) -> dict[str, Any]:
    """For the Prometheus Operator (monitoring.coreos.com/v1): scrape the Service's http port every 15 s."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": metadata(spec),
            "spec": {"selector": {"matchLabels": spec.selector},
                     "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}]}}
