#!/usr/bin/env bash
# Installs what chresilient's tests and demo need on a fresh Debian machine (as root):
# Debian's clickhouse-server, a virtualenv in .venv, and the package with its extras.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    echo "bootstrap: apt-get update" >&2
    as_root apt-get update -qq
    apt_updated=1
  fi
  echo "bootstrap: apt-get install $*" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! command -v clickhouse-server >/dev/null 2>&1 && [ ! -x /usr/sbin/clickhouse-server ]; then
  apt_install clickhouse-server
fi
# The tests load exported spool batches with it, as an operator would.
if ! command -v clickhouse-client >/dev/null 2>&1; then
  apt_install clickhouse-client
fi
# ZooKeeper (and its Java) for the replicated-cluster tests (chresilient.testing.cluster).
if [ ! -f /usr/share/java/zookeeper.jar ]; then
  apt_install zookeeper
fi

# To validate docker/docker-compose.yml in the tests (no Docker engine is needed for that).
if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
  apt_install docker-compose
fi

PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  apt_install python3 python3-venv python3-dev
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    apt_install python3-venv
    "$PYTHON" -m venv .venv
  fi
fi
echo "bootstrap: pip install -e .[test,dev,flask,sqlalchemy,progress,bench,numpy,otel,django]" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check \
  -e '.[test,dev,flask,sqlalchemy,progress,bench,numpy,otel,django]'

# clickhouse-driver's own tests, from the source distribution of the installed version
# (tests/integration/test_driver_suite.py runs them through chresilient.Client).
version=$(.venv/bin/python -c 'import clickhouse_driver; print(clickhouse_driver.__version__)')
if [ ! -f ".cache/driver-sdist/clickhouse_driver-$version.tar.gz" ]; then
  echo "bootstrap: pip download clickhouse-driver==$version (source distribution)" >&2
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps \
    --no-binary :all: -d .cache/driver-sdist "clickhouse-driver==$version"
fi
