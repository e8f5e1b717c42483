"""Flower behind basic auth: 401 without credentials; with them it shows the running worker."""
import sys
from pathlib import Path

import httpx
import pytest

from scripts.services import free_port
from tests.support.processes import Proc, wait_until

BIN = Path(sys.executable).parent
USER, PASSWORD = "ops", "flower-test-pw"


@pytest.fixture
def flower(env, log_dir, worker):
    port = free_port()
    proc = Proc("flower", [str(BIN / "celery"), "-A", "worker", "flower", f"--port={port}",
                           "--address=127.0.0.1", f"--basic-auth={USER}:{PASSWORD}"],
                env, log_dir / f"flower-{port}.log", port=port).start()

    def up():
        if not proc.alive():
            raise AssertionError(f"flower exited:\n{proc.log()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=1).status_code
        except httpx.HTTPError:
            return None
    wait_until(up, 30, "flower to listen")
    yield f"http://127.0.0.1:{port}"
    proc.stop()


def test_flower_needs_basic_auth_and_shows_the_worker(flower, worker):
    assert httpx.get(f"{flower}/api/workers", timeout=5).status_code == 401
    assert httpx.get(f"{flower}/workers", timeout=5).status_code == 401
    assert httpx.get(f"{flower}/api/workers", auth=(USER, "wrong"), timeout=5).status_code == 401

    def listed():
        r = httpx.get(f"{flower}/api/workers", params={"refresh": "1"}, auth=(USER, PASSWORD), timeout=10)
        assert r.status_code == 200, r.text
        return [name for name in r.json() if name.startswith("worker@")]
    (name,) = wait_until(listed, 30, "flower to list the worker", interval_s=0.5)

    page = httpx.get(f"{flower}/workers", auth=(USER, PASSWORD), timeout=10)
    assert page.status_code == 200 and "Workers" in page.text


def test_flower_shows_the_webhook_tasks_and_queue(flower, worker):
    """Deliveries are tasks of their own names on a queue of their own (a slow receiver never
    sits in a payment queue)."""
    def info():
        r = httpx.get(f"{flower}/api/workers", params={"refresh": "1"}, auth=(USER, PASSWORD), timeout=10)
        workers = [v for k, v in r.json().items() if k.startswith("worker@")]
        return workers[0] if workers and workers[0].get("registered") and workers[0].get("active_queues") else None
    found = wait_until(info, 30, "flower to know the worker's tasks and queues", interval_s=0.5)
    assert {"wallet.webhooks.deliver", "wallet.webhooks.fanout"} <= set(found["registered"])
    assert "webhooks" in {q["name"] for q in found["active_queues"]}
