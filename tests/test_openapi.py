"""GET /openapi.json: every route documented, a valid OpenAPI 3.1 document, and the API held
to it by schemathesis against a real `notifier serve` (no 5xx; every status, content type
and JSON body as documented)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import requests
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.definitions import OPENAPI_31

from notifier import openapi
from notifier.app import create_app
from notifier.errors import ConfigurationError
from notifier.resources import data_dir
from notifier.settings import Settings
from tests.conftest import (
    ADMIN_KEY,
    API_KEYS,
    auth,
    free_port,
    healthy,
    run_worker,
    spawn_notifier,
    transition,
    wait_until,
)
from tests.test_editor import sign_in
from tests.test_webhooks import ec_keys

Client = TestClient[Any, Any]


def routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route the router holds, as the router writes the path."""
    return {(route.method, r.canonical) for r in app.router.resources() for route in r}


def test_every_route_is_in_the_document_with_each_method(settings: Settings) -> None:
    app = create_app(settings)
    paths = openapi.document(app)["paths"]
    registered = routes(app)
    assert len(registered) > 50  # the API, the admin API, the editor, webhooks, operations
    for method, path in registered:
        # HEAD is aiohttp's, wherever GET is (the document says so once)
        documented = "GET" if method == "HEAD" else method
        assert documented.lower() in paths.get(path, {}), f"{method} {path}"
    # ... and nothing else: no operation for a route that does not exist
    listed = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    assert listed == {(m, p) for m, p in registered if m != "HEAD"}


def test_every_get_route_answers_head_too(settings: Settings) -> None:
    """As the README says; the editor's pages answered HEAD with 405."""
    registered = routes(create_app(settings))
    gets = {path for method, path in registered if method == "GET"}
    assert gets and gets == {path for method, path in registered if method == "HEAD"}


def test_a_route_without_documentation_fails_the_document(settings: Settings) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = create_app(settings)
    app.router.add_post("/v1/merchants/{merchant_id}/undocumented", handler)
    with pytest.raises(ConfigurationError, match=r"POST /v1/merchants/\{merchant_id\}/undoc"):
        openapi.document(app)
    # a new method on a documented path is a new operation too
    app = create_app(settings)
    app.router.add_patch("/v1/merchants/{merchant_id}/brand", handler)
    with pytest.raises(ConfigurationError, match=r"PATCH /v1/merchants/\{merchant_id\}/brand"):
        openapi.document(app)


def schemas_in(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON Schema the document holds (components, parameters, bodies, replies)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema" and isinstance(value, dict):
                yield value
            elif key == "schemas" and isinstance(value, dict):
                yield from value.values()
            yield from schemas_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from schemas_in(value)


def test_the_document_is_valid_openapi_3_1(settings: Settings) -> None:
    doc = openapi.document(create_app(settings))
    # the OpenAPI Initiative's schema of OAS 3.1 documents (schemathesis ships a copy)
    jsonschema.Draft202012Validator(OPENAPI_31).validate(doc)
    # ... which leaves the JSON Schemas inside to their own dialect
    for schema in schemas_in(doc):
        jsonschema.Draft202012Validator.check_schema(schema)
    text = json.dumps(doc)
    for ref in set(re.findall(r'"\$ref": "#/components/(\w+)/([^"]+)"', text)):
        assert ref[1] in doc["components"][ref[0]], ref
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    # every operation loads in schemathesis (no schema error for any of them)
    loaded = list(schemathesis.openapi.from_dict(doc).get_all_operations())
    assert len(loaded) == len(ids)
    assert all(isinstance(result, Ok) for result in loaded), [
        result for result in loaded if not isinstance(result, Ok)
    ]


async def test_the_document_is_served_and_built_once(client: Client) -> None:
    first = await client.get("/openapi.json")
    assert first.status == 200 and first.content_type == "application/json"
    assert await first.json() == openapi.document(client.app)
    built = openapi._BUILT[client.app]
    second = await client.get("/openapi.json")
    assert await second.read() == built
    assert openapi._BUILT[client.app] is built


def conforms(doc: dict[str, Any], method: str, path: str, status: int, body: Any) -> None:
    """``body`` is what the document says ``method path`` answers with ``status``."""
    reply = doc["paths"][path][method.lower()]["responses"][str(status)]
    schema = reply["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator(
        {**schema, "components": doc["components"]},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    validator.validate(body)


async def test_replies_about_real_data_keep_the_document(
    client: Client, settings: Settings
) -> None:
    """What random requests cannot reach (a shipment with decisions and deliveries, a
    published version, a test send, a partly invalid batch) answers as documented too."""
    doc = openapi.document(client.app)
    v1 = "/v1/merchants/{merchant_id}"

    async def call(method: str, path: str, status: int, url: str, **kwargs: Any) -> Any:
        resp = await client.request(method, url, headers=auth(), **kwargs)
        assert resp.status == status, await resp.text()
        body = await resp.json()
        conforms(doc, method, path, status, body)
        return body

    later = transition(event_id="evt_2", status="delivered", occurred_at="2026-11-21T13:00:00Z")
    items = [transition(), later]
    await call("POST", "/v1/transitions", 202, "/v1/transitions", json={"transitions": items})
    await run_worker(settings)
    bad = {**transition(event_id="evt_3"), "carrier": ""}
    conflict = {**transition(), "carrier": "dhl"}
    odd_id = {**transition(), "event_id": 5}  # an invalid item's event_id is not echoed
    batch = [transition(event_id="evt_4"), bad, odd_id]
    for body in ({"transitions": batch}, {"transitions": [conflict]}):
        status = 422 if bad in body["transitions"] else 409
        refusal = await call("POST", "/v1/transitions", status, "/v1/transitions", json=body)
        assert refusal["error"]["details"]
        if status == 422:
            assert refusal["results"][2] == {"index": 2, "event_id": None, "status": "rejected"}
    history = f"{v1}/shipments/{{shipment_id}}/notifications"
    page = await call("GET", history, 200, "/v1/merchants/acme/shipments/shp_123/notifications")
    assert {d["outcome"] for d in page["decisions"]} >= {"sent"}
    assert any(d.get("delivery", {}).get("status") for d in page["decisions"])
    await call(
        "GET", history, 200, f"{history.format(merchant_id='acme', shipment_id='shp_123')}?limit=1"
    )

    globex = "/v1/merchants/globex"  # no files of its own: the draft is all its override
    default = (data_dir("templates", None) / "messages" / "delivered.jinja").read_text()
    saved = await call(
        "PUT",
        f"{v1}/overrides/draft/{{path}}",
        200,
        f"{globex}/overrides/draft/messages%2Fdelivered.jinja",  # as OpenAPI clients send it
        json={"text": default.replace("Your parcel was delivered", "Delivered!")},
    )
    assert saved["problems"] == []
    await call("GET", f"{v1}/overrides", 200, f"{globex}/overrides")
    revision = {"revision": saved["revision"]}
    published = await call(
        "POST", f"{v1}/overrides/publish", 200, f"{globex}/overrides/publish", json=revision
    )
    assert published["published"] is True
    restore = {"version": 0}
    await call(
        "POST", f"{v1}/overrides/rollback", 200, f"{globex}/overrides/rollback", json=restore
    )
    for path in ("overrides/versions", "audit", "templates", "brand", "policy"):
        await call("GET", f"{v1}/{path}", 200, f"{globex}/{path}")
    template = f"{v1}/templates/{{milestone}}"
    await call("GET", template, 200, f"{globex}/templates/delivered?locale=de")
    for channel in ("email", "sms"):
        body = {"milestone": "exception:customs_hold", "channel": channel, "locale": "ar"}
        await call("POST", f"{v1}/preview", 200, f"{globex}/preview", json=body)
    body = {"milestone": "delivered", "to": "merchant@globex.example"}
    await call("POST", f"{v1}/test-send", 200, f"{globex}/test-send", json=body)
    page = await call("GET", history, 200, f"{globex}/shipments/test-sends/notifications")
    assert page["decisions"][0]["test"] is True
    opt_out = {"channel": "sms", "address": "+33612345678"}
    await call("POST", f"{v1}/opt-outs", 200, f"{globex}/opt-outs", json=opt_out)
    await call("GET", "/healthz", 200, "/healthz")
    await call("GET", "/readyz", 503, "/readyz")  # no worker process beats here


async def test_what_the_fuzzing_found_stays_fixed(client: Client, settings: Settings) -> None:
    acme = "/v1/merchants/acme"
    # a preview in a time zone that does not exist: 422 naming it (was a 500)
    body = {"milestone": "delivered", "timezone": "Mars/Olympus_Mons"}
    resp = await client.post(f"{acme}/preview", json=body, headers=auth())
    assert resp.status == 422
    assert [d["field"] for d in (await resp.json())["error"]["details"]] == ["timezone"]
    # a form posted as multipart without its boundary: refused (was a 500)
    multipart = {"Content-Type": "multipart/form-data"}
    resp = await client.post("/merchant/sign-in", data=b"csrf=x&key=y", headers=multipart)
    assert resp.status == 400 and "form could not be read" in await resp.text()
    resp = await client.post("/merchant/acme/brand", data=b"csrf=x", headers=multipart)
    assert resp.status == 401  # the sign-in it needs, said as a page
    twilio = settings.model_copy(update={"twilio_auth_token": "t" * 32})
    async with TestClient(TestServer(create_app(twilio))) as other:
        resp = await other.post("/v1/webhooks/twilio/status", data=b"x", headers=multipart)
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"
    # the editor's live preview answers its script in JSON, refusals included (they were
    # editor pages)
    resp = await client.post("/merchant/acme/preview", json={})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "sign_in_required"
    csrf = await sign_in(client)
    preview = {"milestone": "delivered", "path": "messages/delivered.jinja", "text": "{% if %}"}
    resp = await client.post("/merchant/acme/preview", json=preview, headers={"X-CSRF-Token": csrf})
    assert resp.status == 422 and "delivered.jinja" in (await resp.json())["error"]["message"]
    # the editor's files, and a JSON 404 for any other name (was an empty octet-stream)
    for name, kind in (("editor.css", "text/css"), ("editor.js", "application/javascript")):
        resp = await client.get(f"/merchant/-/static/{name}")
        assert resp.status == 200 and resp.content_type == kind
    resp = await client.get("/merchant/-/static/editor.html")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    # a brand or policy file that is not a mapping of text keys still reads as fields
    for path, text in (("brand.yaml", "1: x\nwhen: 2026-11-21\n"), ("policy.yaml", "- a\n")):
        resp = await client.put(
            f"{acme}/overrides/draft/{path}", json={"text": text}, headers=auth()
        )
        assert resp.status == 200
    brand = await (await client.get(f"{acme}/brand", headers=auth())).json()
    assert brand["override"] == {"1": "x", "when": "2026-11-21"} and brand["problem"]
    policy = await (await client.get(f"{acme}/policy", headers=auth())).json()
    assert policy["override"] == {} and policy["problem"]


# -- schemathesis against a real server ------------------------------------------------------
#: Examples per operation in the fuzzing phase (the coverage phase adds its own cases: the
#: boundaries of every parameter and body field, valid and invalid).
MAX_EXAMPLES = 4
SEED = 20261121
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`notifier serve` in its embedded mode (API and worker in one process), with both
    providers' webhooks configured (so that requests reach their signature checks)."""
    workdir = tmp_path_factory.mktemp("openapi")
    port = free_port()
    proc = spawn_notifier(
        ["serve", "--port", str(port)],
        workdir,
        NOTIFIER_API_KEYS=json.dumps(API_KEYS),
        NOTIFIER_OUTBOX_DIR=str(workdir / "outbox"),
        NOTIFIER_TWILIO_AUTH_TOKEN="twilio-token-0123456789",
        NOTIFIER_SENDGRID_WEBHOOK_PUBLIC_KEY=ec_keys()[1],
    )
    lines: list[str] = []  # read as it comes: a full pipe would stall the server
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: healthy(port) or proc.poll() is not None, "notifier serve")
        assert proc.poll() is None, "".join(lines)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    # every 5xx is logged as an unhandled error: none may have happened
    output = "".join(lines)
    assert "unhandled error" not in output, output[-5000:]


def editor_session(base_url: str) -> str:
    """The cookie of a merchant editor session, signed in with the admin key."""
    with requests.Session() as browser:
        form = browser.get(f"{base_url}/merchant/sign-in", timeout=10)
        token = form.cookies["notifier_sign_in"]
        browser.post(
            f"{base_url}/merchant/sign-in",
            data={"csrf": token, "key": ADMIN_KEY},
            allow_redirects=False,
            timeout=10,
        )
        session = browser.cookies.get("notifier_session", path="/merchant")
    assert session, "signing in to the editor failed"
    return str(session)


#: Operations that check the merchant's whole draft when they change (or show) it.
DRAFT_CHECKS = (
    "editorReview",
    "saveDraftFile",
    "publishDraft",
    "rollback",
    "putTemplate",
    "deleteTemplate",
    "putBrand",
    "putPolicy",
)
#: The document, built here (the test collects one test per operation before any server
#: runs); the server fixture checks that it is the one the server serves.
SETTINGS = Settings(_env_file=None, api_keys=API_KEYS)  # type: ignore[call-arg]
DOCUMENT = openapi.document(create_app(SETTINGS))
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            # a slow shared CI machine is not a finding
            "suppress-health-check": ["too_slow", "filter_too_much"],
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
                # the API key and the editor session are sent as headers
                "with-security-parameters": False,
            },
            "phases": {"stateful": {"enabled": False}},
            "operations": [
                {
                    # each renders every message in every locale (~0.5 s): their
                    # boundaries are tested as refusals, and a few valid changes go through
                    "include-operation-id": list(DRAFT_CHECKS),
                    "phases": {"coverage": {"generation": {"mode": "negative"}}},
                    "generation": {"max-examples": 2},
                }
            ],
        }
    ),
)


@pytest.fixture(scope="module")
def credentials(server: str) -> dict[str, str]:
    """The admin API key, and an editor session so that the fuzzed editor pages are
    rendered (not only redirected to the sign-in page)."""
    served = requests.get(f"{server}/openapi.json", timeout=30)
    assert served.json() == json.loads(json.dumps(DOCUMENT))
    headers = {
        "Authorization": f"Bearer {ADMIN_KEY}",
        "Cookie": f"notifier_session={editor_session(server)}",
    }
    page = requests.get(f"{server}/merchant/acme/brand", headers=headers, timeout=30)
    assert page.status_code == 200 and "<h1>Brand</h1>" in page.text
    return headers


@schema.parametrize()
def test_the_api_keeps_its_document(case: Any, server: str, credentials: dict[str, str]) -> None:
    case.call_and_validate(base_url=server, headers=credentials, checks=CHECKS, timeout=30)
