"""`make run-ha`: `make run` on a replicated PostgreSQL (scripts/ha.py) instead of one server.

etcd and three Patroni nodes under var/ha/ (their ports kept in var/ha/ports.json, the live
nodes in var/ha/nodes.json), then everything `make run` starts, with one multi-host
DATABASE_URL. Ctrl-C or SIGTERM stops it all, the cluster last.
"""
from __future__ import annotations

import sys

from scripts.ha import Cluster
from scripts.run import VAR, main

if __name__ == "__main__":
    sys.exit(main(cluster=Cluster(VAR / "ha", log=lambda line: print(line, flush=True))))
