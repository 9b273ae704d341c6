"""Multi-node objects: one Ray cluster per replica, a pod per node, the server on the Ray head.

LeaderWorkerSet (leaderworkerset.x-k8s.io/v1): a group of `num_workers` pods. The leader runs
`ray start --head`, waits until the group's nodes have joined, then execs `shardllm-serve`; the workers
join with `ray start --block` and live as long as the head's Ray does (a worker exits about 60 s after
the head dies, and RecreateGroupOnPodRestart then restarts the whole group). startupPolicy stays
LeaderCreated: with LeaderReady the workers would wait for a leader that waits for them.

KubeRay (ray.io/v1 RayCluster) with `ray.io/overwrite-container-cmd: "true"`, so the operator keeps our
commands: the head runs the same leader script, one worker group of num_workers - 1 pods joins $FQ_RAY_IP
(the head's address, which KubeRay sets in every worker container).
"""

from __future__ import annotations

from typing import Any

from shardllm.deploy.kubernetes import (
    DeploySpec,
    cache_claim_spec,
    metadata,
    pod_spec,
    scrape_annotations,
    secret_env,
    server_container,
    server_env,
)

RAY_PORT = 6379
# The leader's serve args follow the script as "$@" (bash -c SCRIPT NAME ARGS...), so they stay a plain
# serve argv that round-trips through serve's parser.
LEADER_SCRIPT = """\
set -eu
ray start --head --port={port} --include-dashboard=false --disable-usage-stats
export RAY_ADDRESS=auto  # this node's Ray, for the check below and the server
python3 - <<'EOF'
import os, sys, time
import ray
ray.init(logging_level="ERROR")
want, deadline = int(os.environ["{size_var}"]), time.monotonic() + {timeout}
while (alive := sum(n["Alive"] for n in ray.nodes())) < want:
    if time.monotonic() > deadline:
        sys.exit(f"only {{alive}} of {{want}} Ray nodes joined in {timeout} s")
    time.sleep(5)
EOF
exec shardllm-serve "$@"
"""
# Wait for the head's Ray (bounded), then join it and block: the container exits when the head's Ray dies.
WORKER_SCRIPT = """\
set -u
deadline=$((SECONDS + {timeout}))
until ray health-check --address="{head}:{port}" >/dev/null 2>&1; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "no Ray head at {head}:{port} after {timeout} s" >&2
    exit 1
  fi
  sleep 5
done
exec ray start --address="{head}:{port}" --block --disable-usage-stats
"""


def ray_env(spec: DeploySpec) -> list[dict[str, Any]]:
    """RAY_AUTH_MODE is explicit: token auth from a Secret, or off (keep the pods on a private network)."""
    if spec.ray_token_secret:
        return [{"name": "RAY_AUTH_MODE", "value": "token"},
                secret_env("RAY_AUTH_TOKEN", spec.ray_token_secret, "token")]
    return [{"name": "RAY_AUTH_MODE", "value": "disabled"}]


def leader_container(spec: DeploySpec, size_var: str) -> dict[str, Any]:
    c = server_container(spec)
    script = LEADER_SCRIPT.format(port=RAY_PORT, size_var=size_var, timeout=spec.startup_timeout // 2)
    c = {"name": c.pop("name"), "command": ["bash", "-c", script, "shardllm-leader"], **c}
    c["env"] = [*c["env"], *ray_env(spec)]
    c["ports"] = [*c["ports"], {"name": "ray-gcs", "containerPort": RAY_PORT, "protocol": "TCP"}]
    return c


def worker_container(spec: DeploySpec, head: str) -> dict[str, Any]:
    script = WORKER_SCRIPT.format(head=head, port=RAY_PORT, timeout=spec.startup_timeout // 2)
    return {"name": "ray-worker", "command": ["bash", "-c", script],
            "env": [*server_env(spec), *ray_env(spec)]}


def _template(spec: DeploySpec, role: str, container: dict[str, Any], claim: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": {**spec.selector, **spec.labels, "app.kubernetes.io/component": role}}
    if role == "leader":
        meta["annotations"] = scrape_annotations(spec)
    return {"metadata": meta, "spec": pod_spec(spec, container, claim)}


def render_lws(spec: DeploySpec) -> list[dict[str, Any]]:
    # Each pod its own ReadWriteOnce cache claim (volumeClaimTemplates), unless the user names a shared one.
    claim = spec.cache_pvc or "cache"
    group: dict[str, Any] = {
        "size": spec.num_workers,
        "restartPolicy": "RecreateGroupOnPodRestart",
        "leaderTemplate": _template(spec, "leader", leader_container(spec, "LWS_GROUP_SIZE"), claim),
        "workerTemplate": _template(spec, "worker", worker_container(spec, "${LWS_LEADER_ADDRESS}"), claim),
    }
    if not spec.cache_pvc:
        for t in ("leaderTemplate", "workerTemplate"):  # the claim template stands in for the volume
            group[t]["spec"]["volumes"] = [v for v in group[t]["spec"]["volumes"] if v["name"] != "cache"]
        group["volumeClaimTemplates"] = [{"metadata": {"name": "cache"}, "spec": cache_claim_spec(spec)}]
    lws = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "metadata": metadata(spec),
           "spec": {"replicas": spec.replicas, "startupPolicy": "LeaderCreated", "leaderWorkerTemplate": group}}
    return [lws]


def render_kuberay(spec: DeploySpec) -> list[dict[str, Any]]:
    if spec.replicas != 1:
        raise ValueError("--ray_operator kuberay renders one RayCluster (one replica): render one per name, "
                         "or use the default LeaderWorkerSet for --replicas > 1")
    head = leader_container(spec, "SHARDLLM_NUM_NODES")
    head["env"].append({"name": "SHARDLLM_NUM_NODES", "value": str(spec.num_workers)})
    workers = spec.num_workers - 1
    # The RayCluster's pods share one claim: ReadWriteOnce binds it to one node, so pass a ReadWriteMany
    # --cache_pvc for several nodes; without one each pod downloads into its own emptyDir.
    claim = spec.cache_pvc
    cluster = {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": metadata(spec, annotations={"ray.io/overwrite-container-cmd": "true"}),
        "spec": {
            "headGroupSpec": {"rayStartParams": {}, "template": _template(spec, "leader", head, claim)},
            "workerGroupSpecs": [{
                "groupName": "gpu-workers", "replicas": workers, "minReplicas": workers, "maxReplicas": workers,
                "rayStartParams": {},
                "template": _template(spec, "worker", worker_container(spec, "${FQ_RAY_IP}"), claim),
            }],
        },
    }
    return [cluster]
