"""/ready: 200 only when the database and the broker answer; else 503 naming what is down."""
from api import create_app
from scripts.services import free_port
from tests.conftest import AUTH, make_settings


def ready(settings):
    response = create_app(settings).test_client().get("/ready", headers=AUTH)
    return response.status_code, response.get_json()


def test_ready_when_both_answer(settings):
    status, body = ready(settings)
    assert status == 200 and body["checks"] == {"database": True, "broker": True}


def test_names_the_broker_when_it_is_down(database_url):
    status, body = ready(make_settings(database_url, f"redis://127.0.0.1:{free_port()}/0"))
    assert status == 503
    assert body["error"]["code"] == "not_ready" and "broker" in body["error"]["message"]
    assert body["error"]["details"]["checks"] == {"database": True, "broker": False}


def test_names_the_database_when_it_is_down(broker_url):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/wallet"
    status, body = ready(make_settings(dead, broker_url))
    assert status == 503
    assert "database" in body["error"]["message"] and "broker" not in body["error"]["message"]
    assert body["error"]["details"]["checks"] == {"database": False, "broker": True}


def test_names_the_database_server_it_reaches(settings):
    status, body = ready(settings)
    assert status == 200 and body["database"]["primary"] is True
    assert set(body["database"]) == {"address", "port", "primary"}
