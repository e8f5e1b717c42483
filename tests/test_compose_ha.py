"""Static checks of docker-compose.ha.yml, the stack on a replicated PostgreSQL (no Docker engine
needed), in the manner of tests/test_compose.py."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from common.settings import Settings, sqlalchemy_url

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.ha.yml").read_text())
SERVICES = COMPOSE["services"]
PATRONI_DIR = ROOT / "deploy" / "patroni"
PATRONI = yaml.safe_load((PATRONI_DIR / "patroni.yml").read_text())
PATRONI_DOCKERFILE = (PATRONI_DIR / "Dockerfile").read_text()
ETCDS = ["etcd1", "etcd2", "etcd3"]
NODES = ["patroni1", "patroni2", "patroni3"]
APP_SERVICES = ["migrate", "api", "worker", "beat", "flower"]
COMMAND_PREFIXES = ["alembic upgrade head", "gunicorn api:create_app()", "celery -A worker worker",
                    "celery -A worker beat", "celery -A worker flower"]


def command_of(service: str) -> str:
    cmd = SERVICES[service]["command"]
    return " ".join(shlex.split(cmd) if isinstance(cmd, str) else list(cmd))


def conditions(service: str) -> dict:
    return {name: dep["condition"] for name, dep in SERVICES[service]["depends_on"].items()}


def named_volumes(service: str) -> set[str]:
    return {v.split(":", 1)[0] for v in SERVICES[service]["volumes"]}


def test_the_layout():
    assert set(ETCDS + NODES + ["redis", "nginx"] + APP_SERVICES) <= set(SERVICES)
    assert "postgres" not in SERVICES and "version" not in COMPOSE


@pytest.mark.parametrize("service", ETCDS)
def test_etcd_is_3_5_3_or_later_and_a_three_member_cluster(service):
    image = SERVICES[service]["image"]
    version = tuple(int(x) for x in re.search(r":v?(\d+)\.(\d+)\.(\d+)$", image).groups())
    assert version >= (3, 5, 3), image  # 3.5.0-3.5.2 can lose committed writes after a crash
    env = SERVICES[service]["environment"]
    assert env["ETCD_NAME"] == service
    members = dict(m.split("=") for m in env["ETCD_INITIAL_CLUSTER"].split(","))
    assert members == {e: f"http://{e}:2380" for e in ETCDS}
    assert env["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == members[service]
    assert SERVICES[service]["healthcheck"]["test"]


@pytest.mark.parametrize("service", NODES)
def test_patroni_nodes(service):
    spec = SERVICES[service]
    assert spec["build"] == "deploy/patroni"
    env = spec["environment"]
    assert env["PATRONI_NAME"] == service
    assert env["PATRONI_POSTGRESQL_CONNECT_ADDRESS"] == f"{service}:5432"
    assert env["PATRONI_RESTAPI_CONNECT_ADDRESS"] == f"{service}:8008"
    assert set(re.findall(r"(etcd\d):2379", env["PATRONI_ETCD3_HOSTS"])) == set(ETCDS)
    assert conditions(service) == {e: "service_healthy" for e in ETCDS}
    assert "8008" in " ".join(spec["healthcheck"]["test"])
    assert named_volumes(service) <= set(COMPOSE["volumes"])
    others = [n for n in NODES if n != service]
    assert not named_volumes(service) & set().union(*(named_volumes(o) for o in others))


def test_patroni_config_is_synchronous_strict_on_etcd_v3():
    assert "etcd3" in PATRONI and "etcd" not in PATRONI  # `etcd:` speaks v2, off in etcd 3.4+
    dcs = PATRONI["bootstrap"]["dcs"]
    assert dcs["synchronous_mode"] is True and dcs["synchronous_mode_strict"] is True
    assert dcs["loop_wait"] + 2 * dcs["retry_timeout"] <= dcs["ttl"]
    assert dcs["postgresql"]["use_pg_rewind"] is True
    assert dcs["postgresql"]["parameters"]["wal_log_hints"] == "on"
    assert PATRONI["bootstrap"]["post_init"] == "/usr/local/bin/wallet-post-init"


def test_same_timings_as_make_run_ha():
    from scripts.ha import TIMINGS
    dcs = PATRONI["bootstrap"]["dcs"]
    assert {k: dcs[k] for k in TIMINGS} == TIMINGS


def test_patroni_image_pins_the_release_of_requirements_ha():
    base = re.search(r"^FROM\s+(\S+)", PATRONI_DOCKERFILE, re.MULTILINE).group(1)
    assert re.search(r":\d+\.\d+(\.\d+)?-", base), base
    pinned = re.search(r"patroni\[[^\]]*\]==([\d.]+)", (ROOT / "requirements" / "ha.txt").read_text()).group(1)
    assert f"=={pinned}" in PATRONI_DOCKERFILE
    assert re.findall(r"^USER\s+(\S+)", PATRONI_DOCKERFILE, re.MULTILINE)[-1] == "postgres"
    for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", PATRONI_DOCKERFILE, re.MULTILINE):
        *sources, _dest = line.split()
        for src in sources:
            assert (PATRONI_DIR / src).exists(), src


def test_one_multi_host_url_that_only_takes_the_primary():
    url = COMPOSE["x-app-env"]["DATABASE_URL"]
    assert set(re.findall(r"(patroni\d):5432", url)) == set(NODES)
    assert "target_session_attrs=read-write" in url
    for service in APP_SERVICES:
        assert SERVICES[service]["environment"]["DATABASE_URL"] == url, service
    resolved = url.replace("${WALLET_DB_PASSWORD:-wallet}", "wallet")
    _, kwargs = create_engine(sqlalchemy_url(resolved)).dialect.create_connect_args(
        make_url(sqlalchemy_url(resolved)))
    assert kwargs["host"] == "patroni1,patroni2,patroni3" and kwargs["port"] == "5432,5432,5432"
    assert kwargs["target_session_attrs"] == "read-write" and kwargs["dbname"] == "wallet"


def test_apps_wait_for_migrations_and_migrations_for_the_nodes():
    assert conditions("migrate") == {n: "service_healthy" for n in NODES}
    for service in ["api", "worker", "beat"]:
        assert conditions(service) == {"migrate": "service_completed_successfully",
                                       "redis": "service_healthy"}, service
    assert "api" in SERVICES["nginx"]["depends_on"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_commands_are_the_conventional_ones(service):
    assert "build" in SERVICES[service]
    assert command_of(service).startswith(tuple(COMMAND_PREFIXES)), command_of(service)


@pytest.mark.parametrize("service, replicas", [("api", 2), ("worker", 2)])
def test_replicas(service, replicas):
    assert SERVICES[service]["deploy"]["replicas"] == replicas


def test_published_ports_and_nginx():
    assert "8080:8080" in [str(p) for p in SERVICES["nginx"]["ports"]]
    assert "5555:5555" in [str(p) for p in SERVICES["flower"]["ports"]]
    assert any("deploy/nginx.conf" in v for v in SERVICES["nginx"]["volumes"])


def test_every_node_accepts_every_pool_at_once():
    """As tests/test_compose.py: a new primary must take every process's pool (replicas need
    max_connections at least the primary's, so it is set once for the cluster)."""
    d = Settings()
    api_argv = shlex.split(SERVICES["api"]["command"])
    per_api = d.db_pool_size + d.db_max_overflow
    needed = (SERVICES["api"]["deploy"]["replicas"] * int(api_argv[api_argv.index("--workers") + 1]) * per_api
              + SERVICES["worker"]["deploy"]["replicas"] * d.worker_concurrency * (2 + d.db_max_overflow))
    max_connections = PATRONI["bootstrap"]["dcs"]["postgresql"]["parameters"]["max_connections"]
    assert needed + 10 <= max_connections, (needed, max_connections)
