"""Static checks of the production-shaped container stack (no Docker engine needed)."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
NGINX_CONF = ROOT / "deploy" / "nginx.conf"

APP_SERVICES = ["migrate", "api", "worker", "beat", "flower"]
COMMAND_PREFIXES = [
    "alembic upgrade head",
    "gunicorn api:create_app()",  # how the shell/compose sees `gunicorn "api:create_app()"`
    "celery -A worker worker",
    "celery -A worker beat",
    "celery -A worker flower",
]


def command_of(service: str) -> str:
    """The service's command as argv joined by spaces (quotes resolved, as compose does)."""
    cmd = SERVICES[service]["command"]
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return " ".join(argv)


def conditions(service: str) -> dict:
    return {name: dep["condition"] for name, dep in SERVICES[service]["depends_on"].items()}


def test_all_services_exist():
    expected = {"postgres", "redis", "migrate", "api", "nginx", "worker", "beat", "flower"}
    assert expected <= set(SERVICES)
    assert "version" not in COMPOSE


@pytest.mark.parametrize("service", ["postgres", "redis"])
def test_backing_services_have_healthchecks_and_named_volumes(service):
    assert SERVICES[service]["healthcheck"]["test"]
    named = set(COMPOSE.get("volumes") or {})
    sources = {v.split(":", 1)[0] for v in SERVICES[service]["volumes"]}
    assert sources and sources <= named


@pytest.mark.parametrize("service", ["api", "worker"])
def test_two_replicas(service):
    assert SERVICES[service]["deploy"]["replicas"] == 2


@pytest.mark.parametrize("service, port", [("nginx", "8080:8080"), ("flower", "5555:5555")])
def test_published_ports(service, port):
    assert port in [str(p) for p in SERVICES[service]["ports"]]


def test_depends_on_conditions():
    assert conditions("migrate") == {"postgres": "service_healthy"}
    for service in ["api", "worker", "beat"]:
        assert conditions(service) == {
            "migrate": "service_completed_successfully",
            "redis": "service_healthy",
        }, service
    assert "api" in SERVICES["nginx"]["depends_on"]
    assert conditions("flower")["redis"] == "service_healthy"


def test_app_services_share_environment():
    for service in APP_SERVICES:
        env = SERVICES[service]["environment"]
        for key in ["DATABASE_URL", "REDIS_URL", "WALLET_QUEUES", "WALLET_API_KEYS",
                    "WALLET_SWEEP_AFTER_SECONDS"]:
            assert key in env, (service, key)
    assert "FLOWER_BASIC_AUTH" in SERVICES["flower"]["environment"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_commands_are_the_conventional_ones(service):
    assert "build" in SERVICES[service]
    assert command_of(service).startswith(tuple(COMMAND_PREFIXES)), command_of(service)


def test_dockerfile_base_image_is_pinned_and_user_is_not_root():
    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE, re.MULTILINE).group(1)
    assert re.search(r":\d+\.\d+\.\d+", base), base  # tag with a patch version, never `latest`
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}


def test_dockerfile_copies_only_existing_paths():
    for line in re.findall(r"^COPY\s+(.+)$", DOCKERFILE, re.MULTILINE):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies missing path {src}"


def test_nginx_proxies_to_api():
    conf = NGINX_CONF.read_text()
    assert "api:8080" in conf
    assert "proxy_pass" in conf
    assert re.search(r"listen\s+8080", conf)


@pytest.mark.parametrize("module", ["api", "worker"])
def test_app_packages_importable(module):
    # gunicorn "api:create_app()" and celery -A worker need these packages at the repo root.
    assert importlib.util.find_spec(module) is not None


def test_postgres_accepts_every_pool_at_once():
    """API replicas x gunicorn workers x (pool + overflow) + worker replicas x pool processes x
    (2 + 5), with the defaults of common.settings, fit under max_connections with room to spare."""
    from common.settings import Settings
    d = Settings()
    api_argv = shlex.split(SERVICES["api"]["command"])
    api_procs = int(api_argv[api_argv.index("--workers") + 1])
    per_api = d.db_pool_size + d.db_max_overflow
    per_worker_proc = 2 + d.db_max_overflow  # worker.tasks.runtime(): Database(pool_size=2)
    needed = (SERVICES["api"]["deploy"]["replicas"] * api_procs * per_api
              + SERVICES["worker"]["deploy"]["replicas"] * d.worker_concurrency * per_worker_proc)
    match = re.search(r"max_connections=(\d+)", SERVICES["postgres"].get("command", ""))
    max_connections = int(match.group(1)) if match else 100
    assert needed + 10 <= max_connections, (needed, max_connections)


def test_the_default_pool_outnumbers_the_request_threads():
    """Each request thread holds a connection, and admission's recount thread takes one more: a
    pool no larger than the threads opens and closes overflow connections under load (a new
    PostgreSQL backend each time: 12 in 8 s of the bench's `uniform` with a pool of 12)."""
    from common.settings import Settings
    d = Settings()
    assert d.db_pool_size >= d.web_threads + 1
