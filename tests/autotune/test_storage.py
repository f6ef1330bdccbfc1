"""Distributed tuning: the Optuna studies in a real PostgreSQL server (started here on
loopback), shared by two tuners as two machines would share it."""
import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest
import torch

from rewriter.autotune.cache import Cache, current_device
from rewriter.autotune.tuner import tune
from tests.autotune import fake_kernel


def _pg_bin() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(candidates[-1]) if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg2", reason="psycopg2 is needed to reach PostgreSQL (the test extra installs it)")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (.ci/run installs Debian's postgresql package)")
    root = tempfile.mkdtemp(prefix="rewriter-pg-")
    data, port = os.path.join(root, "data"), _free_port()
    prefix = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as an unprivileged user
        user = "postgres" if shutil.which("runuser") and _has_user("postgres") else None
        if user is None:
            pytest.skip("running as root without a 'postgres' user to run the server as")
        shutil.chown(root, user)
        prefix = ["runuser", "-u", user, "--"]
    run = lambda *cmd: subprocess.run(prefix + list(cmd), check=True, capture_output=True, text=True)  # noqa: E731
    run(f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "tuner")
    run(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        run(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "tuner", "optuna")
        yield f"postgresql+psycopg2://tuner@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(prefix + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_two_tuners_share_one_study_in_postgres(postgres_url, tmp_path):
    import optuna

    x = torch.randn(64)
    kernel = fake_kernel.tunable([1, 2, 4])
    # "machine A" runs two configs; "machine B" then asks for the whole grid and runs only
    # what nobody has measured yet
    first = tune(kernel, (x,), trials=2, storage=postgres_url, min_time_s=0.01,
                 cache=Cache(tmp_path / "a.json", device=current_device("cpu")))
    second = tune(kernel, (x,), grid=True, storage=postgres_url, min_time_s=0.01,
                  cache=Cache(tmp_path / "b.json", device=current_device("cpu")))
    assert first.study == second.study
    ran_a = {t.config["BLOCK"] for t in first.trials}
    ran_b = {t.config["BLOCK"] for t in second.trials}
    assert len(ran_a) == 2 and 1 in ran_a and ran_a.isdisjoint(ran_b) and ran_a | ran_b == {1, 2, 4}
    study = optuna.load_study(study_name=first.study, storage=postgres_url)
    assert {t.user_attrs["config"]["BLOCK"] for t in study.trials} == {1, 2, 4}
    assert second.best_config == {"BLOCK": 2}  # the best over both machines' trials (4 is wrong)
    assert second.default_ms is not None  # measured by A, read by B
    (entry,) = Cache(tmp_path / "b.json", device=current_device("cpu")).entries().values()
    assert entry["config"] == {"BLOCK": 2}
