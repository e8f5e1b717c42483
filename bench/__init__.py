"""`make bench`: the benchmark of SPEC section 7 (see bench/run.py)."""
