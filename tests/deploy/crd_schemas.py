"""JSON schemas for the custom resources we render, which kubernetes-validate does not know.

Written from the published Go types (kubernetes-sigs/lws api/leaderworkerset/v1/leaderworkerset_types.go,
ray-project/kuberay ray-operator/apis/ray/v1/raycluster_types.go, prometheus-operator's ServiceMonitor):
their required fields, enums and field names, with additionalProperties false so that a typo fails (the
published CRDs accept unknown fields, see ../shared/notes/ray-kubernetes.md B4). Pod templates and claim
templates are left open here and checked by kubernetes-validate as PodTemplate / PersistentVolumeClaim.
"""

from __future__ import annotations

from typing import Any


def obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
INT_OR_STRING = {"type": ["integer", "string"]}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OPEN = {"type": "object"}  # checked elsewhere (metadata by the API server, templates by kubernetes-validate)


def top(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return obj({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": OPEN, "spec": spec},
               ("apiVersion", "kind", "metadata", "spec"))


LEADER_WORKER_SET = top("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", obj({
    "replicas": INT32,
    "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
    "rolloutStrategy": obj({"type": {"enum": ["RollingUpdate"]},
                            "rollingUpdateConfiguration": obj({"partition": INT32, "maxUnavailable": INT_OR_STRING,
                                                               "maxSurge": INT_OR_STRING})}, ("type",)),
    "networkConfig": obj({"subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}}, ("subdomainPolicy",)),
    "leaderWorkerTemplate": obj({
        "leaderTemplate": OPEN,
        "workerTemplate": OPEN,
        "size": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "restartPolicy": {"enum": ["Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"]},
        "subGroupPolicy": obj({"subGroupPolicyType": {"enum": ["LeaderWorker", "LeaderExcluded"]},
                               "subGroupSize": INT32}),
        "volumeClaimTemplates": {"type": "array", "items": OPEN},
        "persistentVolumeClaimRetentionPolicy": obj({"whenDeleted": {"enum": ["Retain", "Delete"]},
                                                     "whenScaled": {"enum": ["Retain", "Delete"]}}),
    }, ("workerTemplate",)),
}, ("leaderWorkerTemplate",)))

_WORKER_GROUP = obj({
    "groupName": {"type": "string", "minLength": 1},
    "replicas": INT32, "minReplicas": INT32, "maxReplicas": INT32, "numOfHosts": INT32,
    "rayStartParams": STRING_MAP, "template": OPEN,
    "scaleStrategy": obj({"workersToDelete": {"type": "array", "items": {"type": "string"}},
                          "multihostReplicasToDelete": {"type": "array", "items": {"type": "string"}}}),
    "idleTimeoutSeconds": INT32, "suspend": {"type": "boolean"},
}, ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"))

RAY_CLUSTER = top("ray.io/v1", "RayCluster", obj({
    "headGroupSpec": obj({"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                          "headService": OPEN, "enableIngress": {"type": "boolean"},
                          "rayStartParams": STRING_MAP, "template": OPEN}, ("rayStartParams", "template")),
    "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    "rayVersion": {"type": "string"},
    "enableInTreeAutoscaling": {"type": "boolean"},
    "autoscalerOptions": OPEN,
    "headServiceAnnotations": STRING_MAP,
    "suspend": {"type": "boolean"},
}, ("headGroupSpec",)))

SERVICE_MONITOR = top("monitoring.coreos.com/v1", "ServiceMonitor", obj({
    "selector": obj({"matchLabels": STRING_MAP, "matchExpressions": {"type": "array"}}),
    "namespaceSelector": obj({"any": {"type": "boolean"}, "matchNames": {"type": "array"}}),
    "jobLabel": {"type": "string"},
    "endpoints": {"type": "array", "items": obj({
        "port": {"type": "string"}, "targetPort": INT_OR_STRING, "path": {"type": "string"},
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
        "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                                  "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
        "scrapeTimeout": {"type": "string"}, "honorLabels": {"type": "boolean"},
    })},
}, ("selector",)))

CRDS = {"LeaderWorkerSet": LEADER_WORKER_SET, "RayCluster": RAY_CLUSTER, "ServiceMonitor": SERVICE_MONITOR}


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The PodTemplateSpecs inside a custom resource."""
    spec = doc["spec"]
    if doc["kind"] == "LeaderWorkerSet":
        group = spec["leaderWorkerTemplate"]
        return [t for t in (group.get("leaderTemplate"), group["workerTemplate"]) if t]
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]
    return []


def claim_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "LeaderWorkerSet":
        return doc["spec"]["leaderWorkerTemplate"].get("volumeClaimTemplates", [])
    return []
