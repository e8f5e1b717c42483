import subprocess
import sys

from common.routing import queue_index, queue_name


def test_unordered_pair_routes_to_one_queue():
    assert all(queue_index(a, b, 8) == queue_index(b, a, 8) for a in range(1, 30) for b in range(1, 30))


def test_spreads_over_all_queues():
    used = {queue_index(a, a + 1, 8) for a in range(1, 500)}
    assert used == set(range(8))


def test_stable_across_processes():
    """A fresh interpreter (a different hash seed) routes every pair the same way."""
    pairs = [(a, b) for a in range(1, 20) for b in range(20, 40)]
    code = ("from common.routing import queue_index; import sys; "
            f"print([queue_index(a, b, 16) for a, b in {pairs!r}])")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": str(seed), "PYTHONPATH": "."}).stdout
               for seed in (1, 2, 3)}
    assert outputs == {str([queue_index(a, b, 16) for a, b in pairs]) + "\n"}
    # The values are pinned too: a change of hash would reroute in-flight payments.
    assert queue_index(1, 2, 8) == queue_index(2, 1, 8) == 4
    assert queue_name(3) == "payments.3"
