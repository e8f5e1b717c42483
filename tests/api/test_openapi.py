"""The OpenAPI document: it covers every route, and the live API (real gunicorn, real worker)
answers what it says. Schemathesis generates valid and invalid requests from the document and
fails on any 5xx or any response (status, content type, body, headers) not in the document."""
import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as sc
from schemathesis.specs.openapi import checks as oc

from api import openapi
from tests.conftest import AUTH


CHECKS = [sc.not_a_server_error, oc.status_code_conformance, oc.content_type_conformance,
          oc.response_schema_conformance, oc.response_headers_conformance]
# Not negative_data_rejection: unknown query parameters are ignored by design, which it reports.
EXAMPLES = 15  # per operation and mode: about 17 operations x 2 modes x 15 requests


def test_live_api_matches_document(api_url, worker):
    """Valid and invalid requests for every operation (schemathesis's pytest plugin is not
    used: it does not work with pytest 9, so cases are drawn with hypothesis directly)."""
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 17
    failures = []
    for operation in operations:
        if operation.path == "/docs":
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case):
                case.call_and_validate(base_url=api_url, headers=AUTH, checks=CHECKS, timeout=10)
            try:
                run()
            except Unsatisfiable:  # no invalid request exists (no parameters, no body)
                pass
            except (Exception, BaseExceptionGroup) as exc:  # collect all operations' failures, report them together
                failures.append(f"{operation.method.upper()} {operation.path} ({mode}): {exc}")
    assert not failures, "\n\n".join(failures)[:20000]


def test_every_route_is_documented(app):
    documented = {(r.method.upper(), r.path) for r in openapi.ROUTES}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<id:{arg}>", "{%s}" % arg)
        served |= {(m, path) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == documented


def test_document_shape(client):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]
        ["bearerAuth"]["description"]}
    assert doc["paths"]["/health"]["get"]["security"] == []
    create = doc["paths"]["/payments"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PaymentCreate"}
    assert {"$ref": "#/components/schemas/Error"} == \
        create["responses"]["422"]["content"]["application/json"]["schema"]
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in create["parameters"])
    listing = {p["name"] for p in doc["paths"]["/payments"]["get"]["parameters"]}
    assert {"limit", "cursor", "status", "account_id"} <= listing
    payment = doc["components"]["schemas"]["Payment"]["properties"]["amount"]
    assert payment["type"] == "string"
    # the request model is the validating one: strict, no extra fields
    assert doc["components"]["schemas"]["PaymentCreate"]["additionalProperties"] is False


def test_docs_and_document_need_the_key(api_url):
    for path in ("/openapi.json", "/docs"):
        assert httpx.get(f"{api_url}{path}").status_code == 401
    page = httpx.get(f"{api_url}/docs", headers=AUTH)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "swagger-ui" in page.text and '"openapi": "3.1.0"' in page.text
