"""Which payment queue a payment goes to.

The hash must be the same in every process and on every machine (Python's `hash()` is salted per
process), and the same for A->B and B->A so that two accounts that trade often meet in one queue.
"""
from __future__ import annotations

import zlib


def queue_index(buyer_account_id: int, seller_account_id: int, queues: int) -> int:
    low, high = sorted((buyer_account_id, seller_account_id))
    return zlib.crc32(f"{low}:{high}".encode()) % queues


def queue_name(index: int) -> str:
    return f"payments.{index}"


def batch_queue_index(batch_id: int, queues: int) -> int:
    """An atomic batch is applied as one message, wherever its accounts would route."""
    return zlib.crc32(f"batch:{batch_id}".encode()) % queues
