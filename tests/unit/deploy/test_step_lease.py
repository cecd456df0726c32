"""The step lease against a real redis-server on 127.0.0.1 (started here, stopped by its pid)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from pipelines.deploy.step_lease import StepLease, lease_name

redis = pytest.importorskip("redis", reason="redis not installed (pip install -e '.[cluster]')")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (apt-get install -y redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def _counted(calls: list, result, seconds: float = 0.0):
    def fn():
        calls.append(threading.get_ident())
        time.sleep(seconds)
        return result
    return fn


def test_a_redelivered_copy_waits_for_the_live_execution_and_returns_its_result(store):
    calls, results = [], {}
    name = lease_name("task-1", ["evaluation__knn"])
    # the holder runs for longer than the TTL: only renewal keeps the copy from taking over
    first = threading.Thread(target=lambda: results.__setitem__(
        "first", StepLease(store, name, ttl_s=0.3, poll_s=0.05).run(_counted(calls, ["e1", "e2"], 1.5))))
    first.start()
    time.sleep(0.2)
    results["copy"] = StepLease(store, name, ttl_s=0.3, poll_s=0.05).run(_counted(calls, ["other"]))
    first.join()
    assert len(calls) == 1
    assert results == {"first": ["e1", "e2"], "copy": ["e1", "e2"]}
    # a copy delivered after the step finished does not run it again either
    assert StepLease(store, name).run(_counted(calls, ["late"])) == ["e1", "e2"] and len(calls) == 1


def test_a_copy_takes_the_step_over_when_its_holder_stopped_renewing(store):
    name = lease_name("task-2", ["embeddings"])
    store.set(f"fsad:lease:{name}", "a-dead-worker", px=400)  # killed: nobody renews it
    calls = []
    start = time.monotonic()
    assert StepLease(store, name, poll_s=0.05).run(_counted(calls, ["mine"])) == ["mine"]
    assert len(calls) == 1 and time.monotonic() - start >= 0.3
    assert store.get(f"fsad:lease:{name}") is None  # released after the step


def test_a_step_retry_is_a_new_message_and_runs_again(store):
    calls = []
    assert StepLease(store, lease_name("task-3", ["s"])).run(_counted(calls, ["failed"])) == ["failed"]
    assert StepLease(store, lease_name("task-4", ["s"])).run(_counted(calls, ["ok"])) == ["ok"]
    assert len(calls) == 2


def test_a_raising_step_releases_the_lease_and_stores_no_result(store):
    name = lease_name("task-5", ["s"])

    def boom():
        raise RuntimeError("worker code failed")
    with pytest.raises(RuntimeError):
        StepLease(store, name).run(boom)
    assert store.get(f"fsad:lease:{name}") is None and store.get(f"fsad:done:{name}") is None
    assert StepLease(store, name).run(lambda: ["again"]) == ["again"]


def test_a_stalled_holder_does_not_renew_a_lease_someone_else_took(store):
    name = lease_name("task-6", ["s"])
    lease = StepLease(store, name, ttl_s=0.3)
    store.set(lease.key, "the-new-holder", px=5000)
    assert store.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return 1 end return 0", 1, lease.key,
                      lease.token) == 0
    from pipelines.deploy import step_lease
    assert store.eval(step_lease._RENEW, 1, lease.key, lease.token, 100) == 0
    assert store.eval(step_lease._RELEASE, 1, lease.key, lease.token) == 0
    assert store.get(lease.key) == b"the-new-holder"
