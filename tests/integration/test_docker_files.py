"""docker/: the compose file and Dockerfile say what the README and docs promise."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_clickhouse_service_has_a_select_1_healthcheck() -> None:
    check = _compose()["services"]["clickhouse"]["healthcheck"]
    assert "SELECT 1" in " ".join(check["test"])
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in check


def test_backend_waits_for_a_healthy_clickhouse_and_serves_health() -> None:
    backend = _compose()["services"]["backend"]
    assert backend["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert "/health/clickhouse/ready" in " ".join(backend["healthcheck"]["test"])
    assert backend["build"]["dockerfile"] == "docker/Dockerfile"
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "chresilient wait" in dockerfile
    assert "flask_app:app" in dockerfile


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")  # Debian's docker-compose package
    return [legacy] if legacy else None


def test_docker_compose_config_validates() -> None:
    command = _compose_command()
    assert command is not None, "bootstrap installs docker-compose (scripts/bootstrap.sh)"
    result = subprocess.run([*command, "-f", str(DOCKER / "docker-compose.yml"),
                             "--profile", "example", "config", "-q"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_cluster_compose_has_keeper_and_two_healthy_replicas() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.cluster.yml").read_text())
    services = compose["services"]
    assert {"keeper", "clickhouse1", "clickhouse2"} <= set(services)
    for name, port in (("clickhouse1", 9001), ("clickhouse2", 9002)):
        assert "SELECT 1" in " ".join(services[name]["healthcheck"]["test"])
        assert services[name]["depends_on"]["keeper"]["condition"] == "service_healthy"
        assert services[name]["ports"] == [f"127.0.0.1:{port}:9000"]  # docs/cluster.md
    assert "imok" in " ".join(services["keeper"]["healthcheck"]["test"])
    command = _compose_command()
    assert command is not None, "bootstrap installs docker-compose"
    result = subprocess.run([*command, "-f", str(DOCKER / "docker-compose.cluster.yml"),
                             "config", "-q"], capture_output=True, text=True, timeout=60,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
