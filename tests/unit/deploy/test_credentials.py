"""The cluster profile's secrets file without any service: made once, private, read by every command, the
environment winning over it; and the commands' one-line answers when it is missing or nothing runs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fewshot_core.errors import FsadError
from pipelines.placement.credentials import ALL_KEYS, CLIENT_KEYS, ensure_secrets, load_secrets, secrets_path

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def no_secret_env(monkeypatch):
    for key in (*ALL_KEYS, "FSAD_CLUSTER_HOME", "FSAD_PROFILE_CONFIG"):
        monkeypatch.delenv(key, raising=False)


def test_up_generates_private_secrets_once(tmp_path):
    first, created = ensure_secrets(tmp_path / "home")
    path = secrets_path(tmp_path / "home")
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(first) == set(ALL_KEYS) and first["MLFLOW_TRACKING_USERNAME"] == "fsad"
    passwords = [v for k, v in first.items() if k != "MLFLOW_TRACKING_USERNAME"]
    assert len(set(passwords)) == len(passwords) and all(len(p) >= 40 for p in passwords)
    again, created = ensure_secrets(tmp_path / "home")
    assert not created and again == first
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left beside it


def test_environment_wins_over_the_file_and_workers_need_only_the_client_keys(tmp_path, monkeypatch):
    ensure_secrets(tmp_path)
    monkeypatch.setenv("FSAD_REDIS_PASSWORD", "from-env")
    got = load_secrets(tmp_path)
    assert set(got) == set(CLIENT_KEYS) and got["FSAD_REDIS_PASSWORD"] == "from-env"
    # a worker machine without the file: the exported variables are enough
    for key in CLIENT_KEYS:
        monkeypatch.setenv(key, f"{key}-value")
    assert load_secrets(tmp_path / "elsewhere")["FSAD_POSTGRES_PASSWORD"] == "FSAD_POSTGRES_PASSWORD-value"


def test_missing_secrets_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FsadError, match="secrets.env not found; .*copy its secrets.env .* or export "
                                        "FSAD_POSTGRES_PASSWORD, FSAD_REDIS_PASSWORD"):
        load_secrets(tmp_path)
    secrets_path(tmp_path).write_text("FSAD_REDIS_PASSWORD=x\n")
    secrets_path(tmp_path).chmod(0o600)
    with pytest.raises(FsadError, match="has no FSAD_POSTGRES_PASSWORD, MLFLOW_TRACKING_USERNAME"):
        load_secrets(tmp_path)


def test_a_secrets_file_others_can_read_is_refused(tmp_path):
    ensure_secrets(tmp_path)
    secrets_path(tmp_path).chmod(0o644)
    with pytest.raises(FsadError, match=r"readable by other users \(mode 0644\); `chmod 600 .*secrets.env`"):
        load_secrets(tmp_path)


def test_a_damaged_secrets_file_names_the_line(tmp_path):
    path = secrets_path(tmp_path)
    path.write_text("# comment\nFSAD_REDIS_PASSWORD=x\nPATH=/evil\n")
    path.chmod(0o600)
    with pytest.raises(FsadError, match=r"secrets.env:3: expected KEY=VALUE"):
        load_secrets(tmp_path)


def test_a_data_folder_that_trusts_local_users_is_not_started(tmp_path):
    from pipelines.deploy.local import _refuse_trust

    (tmp_path / "pg_hba.conf").write_text("# TYPE DATABASE USER ADDRESS METHOD\nlocal all all scram-sha-256\n"
                                          "host all all 127.0.0.1/32 trust\n")
    with pytest.raises(FsadError, match="trusts connections without a password.*move .* away"):
        _refuse_trust(tmp_path)
    (tmp_path / "pg_hba.conf").write_text("local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n")
    _refuse_trust(tmp_path)


def _deploy(*args, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ALL_KEYS}
    return subprocess.run([sys.executable, "-m", "pipelines.deploy", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": str(ROOT)})


def test_worker_without_secrets_says_where_to_get_them(tmp_path):
    out = _deploy("worker", "--name", "w9", "--home", str(tmp_path), "--profile",
                  str(ROOT / "deploy" / "cluster.yaml"), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("fsad deploy: error: ") and "secrets.env not found" in out.stderr


def test_status_says_when_nothing_runs(tmp_path):
    """One line and exit 3 (an init script's "not running") when `up` never ran; exit 1 with each service's
    state when a service it started has stopped; the codes are in `status --help`."""
    from pipelines.deploy import local
    from pipelines.placement.profile import load_profile

    args = ("--home", str(tmp_path / "home"), "--profile", str(ROOT / "deploy" / "cluster.yaml"))
    out = _deploy("status", *args, cwd=tmp_path)
    assert out.returncode == 3 and out.stderr == ""
    assert out.stdout.startswith("nothing running: no service was started under ") and "deploy up --home" in out.stdout
    assert len(out.stdout.splitlines()) == 1
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    prof = load_profile(str(ROOT / "deploy" / "cluster.yaml"), str(tmp_path / "home"))
    local._run_dir(prof).mkdir(parents=True, exist_ok=True)
    local._record(prof, "redis", gone.pid)
    out = _deploy("status", *args, cwd=tmp_path)
    assert out.returncode == 1 and f"redis            pid {gone.pid}  not running" in out.stdout, out.stdout
    helped = _deploy("status", "--help", cwd=tmp_path)
    assert "exit status: 0 every service runs, 1 some recorded service has stopped, 3 no" in " ".join(helped.stdout.split())
