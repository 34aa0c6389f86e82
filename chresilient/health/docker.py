"""Container health of the ClickHouse server, when a Docker engine is reachable.

Only a local engine on a unix socket is asked (``DOCKER_HOST=unix://...`` or
``/var/run/docker.sock``), with one ``GET /containers/json``. Without a reachable engine
the check is *skipped* with the reason; it is never reported as passed.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
from typing import Any

from ..config import Config

DEFAULT_SOCKET = "/var/run/docker.sock"
_HEALTH = re.compile(r"\((healthy|unhealthy|health: starting)\)")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def socket_path() -> tuple[str | None, str]:
    """The engine's unix socket, or None and why it is not used."""
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return host[len("unix://") :], ""
    if host:
        return None, f"DOCKER_HOST={host} is not a unix socket; only local engines are asked"
    return DEFAULT_SOCKET, ""


def list_containers(path: str, timeout: float) -> list[dict[str, Any]]:
    conn = _UnixConnection(path, timeout)
    try:
        conn.request("GET", "/containers/json?all=1")
        response = conn.getresponse()
        body = response.read(4 * 1024 * 1024)
    finally:
        conn.close()
    if response.status != 200:
        raise OSError(f"Docker API answered HTTP {response.status}")
    data = json.loads(body)
    if not isinstance(data, list):
        raise OSError("unexpected Docker API answer")
    return [c for c in data if isinstance(c, dict)]


def find_clickhouse(containers: list[dict[str, Any]], ports: set[int]) -> dict[str, Any] | None:
    """The container publishing one of ``ports``, else the first with a ClickHouse image."""
    for container in containers:
        published = {p.get("PublicPort") for p in container.get("Ports") or []}
        if published & ports:
            return container
    for container in containers:
        if "clickhouse" in str(container.get("Image", "")).lower():
            return container
    return None


def container_health(cfg: Config, timeout: float) -> dict[str, Any]:
    """``{"status": passed|failed|skipped, ...}`` for the ClickHouse container."""
    path, why = socket_path()
    if path is None:
        return {"status": "skipped", "reason": why}
    if not os.path.exists(path):
        return {"status": "skipped", "reason": f"no Docker socket at {path}"}
    try:
        containers = list_containers(path, timeout)
    except (OSError, ValueError) as exc:
        return {"status": "skipped", "reason": f"Docker engine at {path} not usable: {exc}"}
    container = find_clickhouse(containers, {port for _, port in cfg.hosts})
    if container is None:
        reason = f"no ClickHouse container among {len(containers)} on this engine"
        return {"status": "skipped", "reason": reason}
    names = container.get("Names") or ["?"]
    name = str(names[0]).lstrip("/")
    state = str(container.get("State", ""))
    match = _HEALTH.search(str(container.get("Status", "")))
    health = None if match is None else match.group(1).replace("health: ", "")
    detail = {
        "container": name,
        "image": container.get("Image"),
        "state": state,
        "health": health or "no healthcheck",
    }
    if state == "running" and health in (None, "healthy"):
        return {"status": "passed", "detail": detail}
    return {
        "status": "failed",
        "detail": detail,
        "error": f"container {name} is {health if state == 'running' else state}",
        "recommendation": f"container {name} is not healthy: see `docker logs {name}` and "
        f"`docker inspect {name}` (its healthcheck should run SELECT 1)",
    }
