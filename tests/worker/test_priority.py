"""A real Celery worker runs below the priority of what started it (WALLET_WORKER_NICE, 5 by
default), its pool processes too, so that API request threads on the same host run first."""
import os

import psutil


def test_worker_and_its_pool_run_at_a_lower_priority(worker):
    expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)
    main = psutil.Process(worker.popen.pid)
    pool = main.children()
    assert pool, "the prefork pool has no processes"
    assert [p.nice() for p in [main, *pool]] == [expected] * (1 + len(pool))
