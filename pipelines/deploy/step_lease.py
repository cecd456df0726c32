"""At most one live execution of a Dagster step across the Celery workers.

The broker redelivers an unacknowledged step message once the visibility timeout has passed, whether its
worker died or is merely still busy. Redelivery is what moves a dead worker's step to a live one, but a step
that simply runs longer than the timeout would then run twice (twice the MLflow runs, two writers of one
partition). The lease tells the two apart: the executing worker holds a short-lived Redis key and renews it
while the step runs. A redelivered copy that finds the key held waits for that execution and hands back its
result; one that finds the key expired (its holder died) takes the step over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable

log = logging.getLogger("fsad.worker")

# Renew only if the key is still ours: a holder that stalled past the TTL must not steal back a taken-over lease.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class StepLease:
    """``run(fn)`` executes ``fn`` under the lease named ``name`` or returns the result of the execution that
    holds it. ``ttl_s``: how long a silent holder counts as alive; ``keep_s``: how long a finished result is
    kept for late copies of the message."""

    def __init__(self, redis, name: str, ttl_s: float = 60.0, keep_s: float = 7 * 24 * 3600,
                 poll_s: float = 1.0):
        self.redis, self.ttl_ms, self.keep_s, self.poll_s = redis, int(ttl_s * 1000), int(keep_s), poll_s
        self.key, self.done_key = f"fsad:lease:{name}", f"fsad:done:{name}"
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self.name = name

    def run(self, fn: Callable[[], list]) -> list:
        waited = False
        while True:
            if (done := self.redis.get(self.done_key)) is not None:
                if waited:
                    log.warning("step %s finished in its other execution; this copy returns that result", self.name)
                return json.loads(done)
            if self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
                break
            if not waited:
                log.warning("step %s is running in another live worker (a redelivered message); waiting for it",
                            self.name)
                waited = True
            time.sleep(self.poll_s)
        if waited:
            log.warning("step %s: its other execution stopped renewing its lease; running it here", self.name)
        stop = threading.Event()
        beat = threading.Thread(target=self._renew, args=(stop,), daemon=True, name="fsad-step-lease")
        beat.start()
        try:
            result = fn()
            self.redis.set(self.done_key, json.dumps(result), ex=self.keep_s)
            return result
        finally:
            stop.set()
            beat.join()
            self.redis.eval(_RELEASE, 1, self.key, self.token)

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl_ms / 3000):
            try:
                if not self.redis.eval(_RENEW, 1, self.key, self.token, self.ttl_ms):
                    log.warning("step %s: lease lost (this worker stalled past %d ms)", self.name, self.ttl_ms)
                    return
            except Exception as exc:  # a broker hiccup: keep trying; the TTL decides if it lasts too long
                log.warning("step %s: lease not renewed (%s)", self.name, exc)


def lease_name(task_id: str, step_keys: list[str]) -> str:
    """Redelivered copies of a message share its task id; a step retry is a new message with a new id."""
    return f"{task_id}:{','.join(sorted(step_keys))}"
