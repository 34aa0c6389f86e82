"""clickhouse-driver's own tests, with its ``Client`` swapped for ``chresilient.Client``.

The tests come from the driver's source distribution (the installed version), run twice
on one private server, concurrently, in two databases: once as they are, once with
``tests/driver_suite/conftest_swap.py`` binding every ``Client`` they import to
chresilient's. Every test the bare driver passes must pass through chresilient, except
the differences docs/migration.md lists, each for a reason the design chose.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import clickhouse_driver
import pytest

from chresilient.testing.server import LocalClickHouse

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "tests" / "driver_suite"
SDIST_DIR = Path(os.environ.get("CHRESILIENT_DRIVER_SDIST_DIR", REPO / ".cache" / "driver-sdist"))
RUN_TIMEOUT = 900  # both runs take ~30 s and ~80 s on 2 cores; this only catches a hang

# Bare-driver passes that fail through chresilient on purpose (docs/migration.md).
DIFFERENCES = {
    # The driver pings before every query; the pool checks liveness on checkout instead.
    "tests.test_connect.ConnectTestCase::test_eof_on_receive_packet": "no per-query ping",
    "tests.test_connect.ConnectTestCase::test_ping_got_unexpected_package": "no per-query ping",
    "tests.test_connect.ConnectTestCase::test_transport_disable_reconnect": "no per-query ping",
    "tests.test_connect.ConnectTestCase::test_transport_not_connection_on_disconnect": (
        "no per-query ping"
    ),
    # Transport errors are retried; what is raised in the end is ClickHouseUnavailableError
    # (also an instance of the driver's class), whose message counts the attempts.
    "tests.test_connect.ConnectTestCase::test_timeout_error": "retried; message differs",
    "tests.test_connect.ConnectTestCase::test_unknown_packet": "retried; message differs",
    "tests.test_connect.ConnectTestCase::test_unknown_packet_on_connect": (
        "retried; message differs"
    ),
    # A second stream gets its own pooled connection instead of an error.
    "tests.test_connect.ConnectTestCase::test_partially_consumed_query": "one connection per call",
    # USE would change the database of one pooled connection for its next user.
    "tests.test_connect.ConnectTestCase::test_remember_current_database": "USE is refused",
    # The driver's own per-client connection deque, which a pool does not have.
    "tests.test_connect.ConnectTestCase::test_round_robin": "connections is the driver's view",
    # The driver remembers the last host that answered; here the breaker decides.
    "tests.test_connect.ConnectTestCase::test_alt_hosts": "failover follows the breaker",
    "tests.test_dbapi.DBAPITestCase::test_remember_last_host": "failover follows the breaker",
}


def driver_sdist() -> Path:
    """The installed driver version's source distribution (scripts/bootstrap.sh fetches
    it; fetched here when missing)."""
    version = clickhouse_driver.__version__
    name = f"clickhouse_driver-{version}.tar.gz"
    path = SDIST_DIR / name
    if not path.exists():
        SDIST_DIR.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        fetch = subprocess.run(
            [*pip, "-d", str(SDIST_DIR), f"clickhouse-driver=={version}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if not path.exists():
            pytest.fail(
                f"clickhouse-driver {version}'s source distribution is missing from "
                f"{SDIST_DIR} and pip could not fetch it: run scripts/bootstrap.sh or put "
                f"{name} there.\n{fetch.stderr[-2000:]}"
            )
    return path


def prepare(workdir: Path, sdist: Path, server: LocalClickHouse, database: str) -> None:
    """The driver's tests, the helper modules its sdist leaves out, and its setup.cfg."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/tests/" in m.name and m.isfile()]
        for member in members:
            member.name = member.name.split("/", 1)[1]
        tar.extractall(workdir, members=members, filter="data")
    shutil.copytree(SUITE / "shim" / "tests", workdir / "tests", dirs_exist_ok=True)
    shutil.copy(SUITE / "conftest_swap.py", workdir / "conftest.py")
    (workdir / "setup.cfg").write_text(
        "[db]\n"
        f"host = {server.host}\nport = {server.port}\nsecure_port = 9440\n"
        f"database = {database}\nuser = default\npassword =\n"
        "compression = lz4,lz4hc,zstd\nclient = clickhouse-client\n\n"
        "[log]\nlevel = ERROR\n"
    )


def start(workdir: Path, swap: bool) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CHRESILIENT_DRIVER_SWAP": "1" if swap else "0", "TZ": "UTC"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    log = (workdir / "pytest.log").open("wb")
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=120"]
    return subprocess.Popen(
        [*pytest_cmd, "--junitxml", str(workdir / "results.xml"), "tests"],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def outcomes(workdir: Path) -> dict[str, str]:
    """test id -> passed / failed / skipped, from the run's JUnit XML."""
    results = {}
    for case in ET.parse(workdir / "results.xml").iter("testcase"):
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = "skipped"
        results[f"{case.get('classname')}::{case.get('name')}"] = status
    return results


@pytest.mark.slow
def test_the_drivers_own_tests_pass_through_chresilient(
    clickhouse_server: LocalClickHouse, tmp_path: Path
) -> None:
    sdist = driver_sdist()
    runs = {}
    for swap in (False, True):
        workdir = tmp_path / ("chresilient" if swap else "bare")
        workdir.mkdir()
        prepare(workdir, sdist, clickhouse_server, "driver_" + workdir.name)
        runs[swap] = (workdir, start(workdir, swap))
    for workdir, proc in runs.values():
        proc.wait(timeout=RUN_TIMEOUT)
        assert (workdir / "results.xml").exists(), (workdir / "pytest.log").read_text()[-3000:]
    bare, ours = outcomes(runs[False][0]), outcomes(runs[True][0])

    passed_bare = {t for t, s in bare.items() if s == "passed"}
    passed_ours = {t for t, s in ours.items() if s == "passed"}
    assert len(passed_bare) >= 150, "the driver's suite hardly ran: " + str(sorted(bare)[:20])
    assert set(ours) == set(bare)  # the same tests were collected
    lost = passed_bare - passed_ours
    unexplained = sorted(lost - set(DIFFERENCES))
    log = (runs[True][0] / "pytest.log").read_text()
    assert not unexplained, f"pass bare, fail through chresilient: {unexplained}\n{log[-6000:]}"
    # A difference that no longer shows is one the docs describe wrongly now.
    assert sorted(set(DIFFERENCES) - lost) == [], "fixed: update DIFFERENCES and the docs"
