"""Joining a Ray cluster (the Ray executor's first step): the address given, $RAY_ADDRESS, the cluster this node's
latest `ray start` recorded, or a new local one; and, before Ray's own retries (minutes against an address that is
not a GCS), a check that the address answers as one, so that a wrong address fails in seconds with the fix."""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # reaching the Ray cluster's GCS


def connect(address: str | None, num_workers: int | None = None) -> bool:
    """Attach to a Ray cluster: `address`, else $RAY_ADDRESS, else one this process already joined, else the
    latest local `ray start` cluster, else a new local one (not with num_workers > 1: other nodes cannot join
    it). Returns whether this call joined or started it (then shutdown leaves it). An address that does not
    answer as a Ray GCS fails within CONNECT_TIMEOUT_S, before Ray's own retries (minutes) begin."""
    from shardllm.executor.ray import _import_ray

    ray = _import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address and address not in ("auto", "local"):
        if address.startswith("ray://"):
            raise ValueError(f"ray_address={address!r}: Ray Client addresses are not supported; run shardllm on "
                             "a node of the cluster with the GCS address (head:6379)")
        _check_gcs(address)
        return _join(ray, address, kwargs)
    if address == "local":
        ray.init(**kwargs)
        return True
    try:
        recorded = _local_cluster_address()
    except LookupError:  # this Ray has no such helper: let ray.init look (it retries a dead address for minutes)
        try:
            ray.init(address="auto", **kwargs)
            return True
        except ConnectionError:
            recorded = None
    if recorded is not None:
        _check_gcs(recorded, recorded=True)
        # "auto", not the address: only then does Ray turn on token auth from this node's ~/.ray/auth_token
        return _join(ray, "auto", kwargs, shown=recorded)
    if address == "auto":
        raise ValueError("ray_address='auto' but no Ray cluster runs on this node: start one with "
                         "`ray start --head --port=6379`, or set RAY_ADDRESS=<head>:6379")
    if num_workers and num_workers > 1:
        raise ValueError(f"num_workers={num_workers} spreads the ranks over {num_workers} Ray nodes, but no Ray "
                         "cluster runs on this node and neither --ray_address nor RAY_ADDRESS names one: start the "
                         "head here with `ray start --head --port=6379`, join the other nodes with "
                         "`ray start --address=<this node's IP>:6379`, then start shardllm again")
    logger.info("ray: no cluster found; starting a local one")
    ray.init(**kwargs)
    return True


def _join(ray, address: str, kwargs: dict, shown: str | None = None) -> bool:
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:  # not a GCS, or token auth refused us (Ray gives up after about 20 s)
        raise ValueError(
            f"could not join the Ray cluster at {shown or address}: {e}. Check that it is the head's GCS address "
            "(`ray status` on the head), and, if the cluster uses token auth (`ray start` logged 'Token "
            "authentication is enabled'), set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or "
            "~/.ray/auth_token) here: Ray sends this node's token only to a cluster it found itself") from None
    return True


def _local_cluster_address() -> str | None:
    """The cluster `ray.init(address="auto")` would join: the one the latest `ray start` recorded on this node
    (ray_current_cluster in Ray's temp dir), else a GCS process running here; None when there is none.
    LookupError when this Ray version lacks the (internal) helper."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        raise LookupError("ray._private.services.canonicalize_bootstrap_address") from None
    try:
        return canonicalize_bootstrap_address("auto")
    except ConnectionError:
        return None


# An HTTP/2 client's connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with its
# own SETTINGS frame (type 4); the dashboard or any HTTP/1 service answers otherwise or not at all.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _check_gcs(address: str, recorded: bool = False) -> None:
    """ValueError, within about CONNECT_TIMEOUT_S, unless `address` is HOST:PORT and a gRPC server (a Ray GCS)
    answers there. ray.init itself retries an address that is not a GCS for minutes."""
    where = (f"the Ray cluster recorded on this node ({address}, by the latest `ray start`)" if recorded
             else f"the Ray cluster at {address}")
    if address.startswith(("http://", "https://")):
        raise ValueError(f"ray_address / RAY_ADDRESS={address!r} is an HTTP address (Ray's dashboard and job API, "
                         "port 8265): shardllm joins the cluster through the head's GCS address, HOST:6379, the one "
                         "`ray start --address=` takes")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray_address / RAY_ADDRESS={address!r} is not HOST:PORT (e.g. 10.0.0.1:6379)")
    fix = ("its head is gone: run `ray stop --force` on this node (it clears the record), then "
           "`ray start --head --port=6379`, or name a live cluster with --ray_address / RAY_ADDRESS" if recorded
           else f"start the head with `ray start --head --port={port}` there, or fix --ray_address / RAY_ADDRESS")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        raise ValueError(f"cannot reach {where} ({e.strerror or e}): {fix}") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        sock.close()
        return  # TLS comes first there: the preface below would not be understood
    head = b""
    with sock:
        try:
            sock.sendall(_H2_PREFACE)
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError:  # a timeout, a reset: not a GCS either way
            pass
    if len(head) < 9 or head[3] != 4:
        what = "it speaks another protocol" if head else f"it did not answer within {CONNECT_TIMEOUT_S:g} s"
        if recorded:
            raise ValueError(f"{where} does not answer as a Ray GCS ({what}; a GCS speaks gRPC): {fix}")
        raise ValueError(f"{address} accepts connections but is not a Ray cluster's GCS ({what}, a GCS speaks "
                         "gRPC): give the head's GCS address, the port of `ray start --head --port=PORT` (6379 by "
                         "default), not the dashboard's (8265) or another service's")
