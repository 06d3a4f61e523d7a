"""The OpenAPI 3.1 document of every route, served at ``GET /openapi.json``.

The document is built by walking the application's router: every route registered there
must have an entry in ``operations()`` below, or building the document fails naming it
(tests/test_openapi.py builds it for the real application). Bodies and replies are the
pydantic models the handlers validate with (models.py, admin.py, app.py) or keep
(api_models.py); their ``$defs`` become ``components/schemas``.

HEAD is left out: aiohttp answers it wherever GET is routed (same headers, no body).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema
from pydantic_core import core_schema

from notifier import __version__
from notifier import api_models as m
from notifier.admin import PreviewRequest, Publish, Rollback, SaveFile, TestSend
from notifier.admin_views import milestones
from notifier.errors import ConfigurationError
from notifier.models import Identifier, MerchantId, Transition
from notifier.overrides import PATH as OVERRIDE_PATH
from notifier.web import STATIC
from notifier.web.session import COOKIE

JSON, HTML, FORM = "application/json", "text/html", "application/x-www-form-urlencoded"
#: An editor refusal: a page, or the router's JSON for a path that matches no route.
BOTH = (HTML, JSON)
REF = "#/components/schemas/{model}"
BEARER, SESSION = "apiKey", "editorSession"

#: The JSON error of each status, for the routes that can give it.
ERRORS = {
    400: "Malformed body (not JSON, or not what the route reads).",
    401: "No API key, or an unknown one (`WWW-Authenticate: Bearer`).",
    403: "The key may not act for that merchant, or a signature is wrong.",
    404: "No such merchant, shipment, file or milestone.",
    405: "The path is a page, read with GET (`Allow: GET, HEAD`).",
    409: "The request conflicts with the current state (see `error.code`).",
    413: "The body is over the limit.",
    415: "`Content-Type` must be `application/json`.",
    422: "The body or query breaks the contract; `error.details` names every field.",
    429: "The key is over its rate limit; retry after `Retry-After` seconds.",
    503: "Redis cannot take the request now; retry after `Retry-After` seconds.",
}
_HEADERS = {
    401: ("WWW-Authenticate", "Bearer"),
    405: ("Allow", "the methods the path takes"),
    429: ("Retry-After", "seconds"),
    503: ("Retry-After", "seconds"),
}


@dataclass(frozen=True)
class Reply:
    """One documented answer: its media types (JSON ones with these models)."""

    description: str
    models: tuple[type[BaseModel], ...] = ()
    media: tuple[str, ...] = (JSON,)
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Body:
    model: type[BaseModel]
    media: str = JSON
    alternatives: tuple[type[BaseModel], ...] = ()
    required: bool = True


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["query", "header"]
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True)
class Op:
    """The documentation of one route."""

    id: str
    summary: str
    tag: str
    replies: dict[int, Reply]
    body: Body | None = None
    params: tuple[Param, ...] = ()
    security: str | None = BEARER
    description: str = ""


def refusals(*statuses: int, media: tuple[str, ...] = (JSON,)) -> dict[int, Reply]:
    """The error replies ``statuses`` (as JSON error bodies, or editor pages)."""
    return {
        s: Reply(
            ERRORS[s],
            (m.ErrorReply,),
            media,
            (_HEADERS[s],) if s in _HEADERS else (),
        )
        for s in statuses
    }


def ok(*models: type[BaseModel], status: int = 200, what: str = "Done.") -> dict[int, Reply]:
    return {status: Reply(what, models)}


#: The refusals of every route behind an API key.
KEYED = (401, 403, 404, 429)
#: ... and of those that read a JSON body.
KEYED_BODY = (*KEYED, 400, 413, 415, 422)
#: An editor page: a page, a redirect to sign in, or one explaining a refusal (the router's
#: own 404 for a path that matches no route is JSON).
PAGE = {200: Reply("The page.", media=(HTML,))}
SEE_OTHER = {303: Reply("Where to go next.", media=(), headers=(("Location", "the page"),))}
PAGE_REFUSALS = refusals(400, 401, 403, 404, 409, 413, 422, media=BOTH)
PAGE_GET = {**PAGE, **SEE_OTHER, **refusals(403, 404, media=BOTH)}
PAGE_POST = {**SEE_OTHER, **PAGE_REFUSALS}


@cache
def _path_params() -> dict[str, dict[str, Any]]:
    """Schemas of the path parameters, by name (the routes' patterns)."""
    file_pattern = f"^(?:{OVERRIDE_PATH.pattern})$"
    return {
        "merchant_id": TypeAdapter(MerchantId).json_schema(),
        "shipment_id": TypeAdapter(Identifier).json_schema(),
        "milestone": {
            "type": "string",
            "enum": milestones(),
            "description": "a status, or exception:<code> (exception:customs_hold)",
        },
        "path": {
            "type": "string",
            "pattern": file_pattern,
            "description": "a file of the merchant's override (messages/delivered.jinja); "
            "its '/' may be sent as is or as %2F",
        },
        "token": {"type": "string", "description": "the signed token of the link"},
        "endpoint_id": {"type": "string", "description": "a webhook endpoint's id (we_…)"},
        "filename": {"type": "string", "enum": sorted(STATIC)},
        "tail": {"type": "string", "description": "the rest of a path no editor page has"},
    }


LOCALE = Param("locale", "query", "a locale with a catalog (de, pt_BR); none: every locale")
VARIANT = Param(
    "variant",
    "query",
    "a (default), or b: the message's variant b of an A/B test (the policy's experiments)",
    {"type": "string", "enum": ["a", "b"]},
)


@cache
def operations() -> dict[tuple[str, str], Op]:
    """Every route's documentation, by (method, path as the router writes it)."""
    return {**_api(), **_admin(), **_hooks(), **_analytics(), **_editor()}


def _api() -> dict[tuple[str, str], Op]:
    from notifier.app import OptOut  # app.py imports this module

    v1 = "/v1/merchants/{merchant_id}"
    partial = (m.ErrorReply, m.IngestRefusal)
    signature = Param(
        "X-Notifier-Signature",
        "header",
        '`t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`; required when the service '
        "has NOTIFIER_INGEST_SIGNING_SECRETS (401 without a valid one), ignored otherwise",
    )
    twilio = Param("X-Twilio-Signature", "header", "of the URL and the form", required=True)
    sendgrid = tuple(
        Param(f"X-Twilio-Email-Event-Webhook-{name}", "header", what, required=True)
        for name, what in (("Signature", "ECDSA signature"), ("Timestamp", "unix time"))
    )
    # a link that is not valid: a page saying so, or the API's JSON for a program asking it
    page = {200: Reply("A page.", media=(HTML,)), **refusals(404, media=BOTH)}
    ops = {
        ("POST", "/v1/transitions"): Op(
            "postTransitions",
            "Post a transition, or a batch of them",
            "ingest",
            {
                **ok(m.IngestReply, status=202, what="Every item accepted (or a duplicate)."),
                **refusals(*KEYED_BODY, 503),
                409: Reply("An `event_id` used before with another body: refused.", partial),
                422: Reply("Invalid items by index; a batch's valid ones were accepted.", partial),
            },
            Body(Transition, alternatives=(m.Batch,)),
            (signature,),
            description="DESIGN.md §3. The same `event_id` with the same body again is "
            "acknowledged as a duplicate and never processed twice.",
        ),
        ("GET", f"{v1}/shipments/{{shipment_id}}/notifications"): Op(
            "getShipmentNotifications",
            "A shipment's decisions, each with its message's delivery status",
            "history",
            {**ok(m.HistoryPage), **refusals(*KEYED, 422)},
            params=(
                Param("cursor", "query", "a `next_cursor` from the page before", CURSOR),
                Param("limit", "query", "decisions per page", LIMIT),
            ),
        ),
        ("POST", f"{v1}/opt-outs"): Op(
            "postOptOut",
            "Record that an address opted out of (or back into) a channel",
            "opt-outs",
            {**ok(OptOut), **refusals(*KEYED_BODY, 409)},
            Body(OptOut),
        ),
        ("POST", "/v1/webhooks/twilio/status"): Op(
            "twilioStatus",
            "Twilio's delivery status callback",
            "webhooks",
            {204: Reply("Recorded (or not ours).", media=()), **refusals(400, 403, 404, 413)},
            Body(m.TwilioStatusForm, FORM),
            (twilio,),
            None,
            "404 while Twilio is not configured; 403 without a valid signature.",
        ),
        ("POST", "/v1/webhooks/twilio/inbound"): Op(
            "twilioInbound",
            "An SMS to our number: STOP, START, HELP",
            "webhooks",
            {
                200: Reply("TwiML: a HELP answer, or nothing.", media=("application/xml",)),
                **refusals(400, 403, 404, 413),
            },
            Body(m.TwilioInboundForm, FORM),
            (twilio,),
            None,
        ),
        ("POST", "/v1/webhooks/sendgrid/events"): Op(
            "sendgridEvents",
            "SendGrid's signed event webhook",
            "webhooks",
            {204: Reply("Recorded.", media=()), **refusals(400, 403, 413)},
            Body(m.SendgridEvents),
            sendgrid,
            None,
            "403 while NOTIFIER_SENDGRID_WEBHOOK_PUBLIC_KEY is unset, and for a bad, missing "
            "or stale signature.",
        ),
        ("GET", "/v1/unsubscribe/{token}"): Op(
            "unsubscribePage",
            "The unsubscribe page: a button (link scanners fetch every URL)",
            "unsubscribe",
            page,
            security=None,
        ),
        ("POST", "/v1/unsubscribe/{token}"): Op(
            "unsubscribe",
            "Unsubscribe (RFC 8058 one click)",
            "unsubscribe",
            page,
            Body(m.OneClickForm, FORM, required=False),
            security=None,
        ),
        ("GET", "/healthz"): Op(
            "healthz",
            "Liveness, Redis and the dead-letter counts",
            "operations",
            {**ok(m.Health), 503: Reply("Redis does not answer.", (m.HealthDown,))},
            security=None,
        ),
        ("GET", "/readyz"): Op(
            "readyz",
            "Ready to take traffic: Redis, templates, catalogs, policy, a live worker",
            "operations",
            {**ok(m.Readiness), 503: Reply("Not ready; the checks say why.", (m.Readiness,))},
            security=None,
        ),
        ("GET", "/metrics"): Op(
            "metrics",
            "Prometheus metrics of the processes sharing NOTIFIER_METRICS_DIR (or this one)",
            "operations",
            {200: Reply("The text exposition format.", media=("text/plain",))},
            security=None,
        ),
        ("GET", "/openapi.json"): Op(
            "openapi",
            "This document",
            "operations",
            ok(m.OpenApiDocument, what="OpenAPI 3.1."),
            security=None,
        ),
    }
    return ops


#: ``cursor`` and ``limit`` of a history page.
CURSOR = {"type": "string", "pattern": "^[0-9]{1,15}$"}
LIMIT = {"type": "integer", "minimum": 1, "maximum": 200, "default": 200}


def _admin() -> dict[tuple[str, str], Op]:
    """The admin API over a merchant's override files (admin.py, admin_views.py)."""
    sent = (m.SentTest,)
    # (method and path under /v1/merchants/{merchant_id}/, operation id, reply, body)
    table: list[tuple[str, str, type[BaseModel], type[BaseModel] | None]] = [
        ("GET overrides", "getOverrides", m.Overview, None),
        ("PUT overrides/draft/{path}", "saveDraftFile", m.Saved, SaveFile),
        ("DELETE overrides/draft/{path}", "discardDraftFile", m.Discarded, None),
        ("POST overrides/publish", "publishDraft", m.Published, Publish),
        ("GET overrides/versions", "getVersions", m.Versions, None),
        ("POST overrides/rollback", "rollback", m.RolledBack, Rollback),
        ("GET audit", "getAudit", m.Audit, None),
        ("POST preview", "preview", m.EmailPreview, PreviewRequest),
        ("POST test-send", "testSend", m.SentTest, TestSend),
        ("GET templates", "getTemplates", m.Templates, None),
        ("GET templates/{milestone}", "getTemplate", m.Template, None),
        ("PUT templates/{milestone}", "putTemplate", m.Saved, m.TemplateText),
        ("DELETE templates/{milestone}", "deleteTemplate", m.Saved, None),
        ("GET brand", "getBrand", m.BrandView, None),
        ("PUT brand", "putBrand", m.Saved, m.Override),
        ("GET policy", "getPolicy", m.PolicyView, None),
        ("PUT policy", "putPolicy", m.Saved, m.Override),
    ]
    summaries = {
        "getOverrides": "Published files and the draft",
        "saveDraftFile": "Save a file into the draft (text null: delete it)",
        "discardDraftFile": "Drop a file's change from the draft",
        "publishDraft": "Publish the draft, if at that revision and without problems",
        "getVersions": "Published versions with author, time and diff",
        "rollback": "Publish the files of a version again",
        "getAudit": "Who changed what, when",
        "preview": "Render a message for a sample parcel",
        "testSend": "Render a message and send it to an address",
        "getTemplates": "Every message template, and where its text comes from",
        "getTemplate": "A message template's text",
        "putTemplate": "Save a message template into the draft",
        "deleteTemplate": "Back to the files beneath (in the draft)",
        "getBrand": "The effective brand and the draft's override",
        "putBrand": "Replace the brand override (in the draft)",
        "getPolicy": "The effective cadence policy and the draft's override",
        "putPolicy": "Replace the policy override (in the draft)",
    }
    more = {
        "preview": ok(m.EmailPreview, m.SmsPreview),
        "publishDraft": refusals(409),
        "rollback": refusals(409),
        "testSend": {502: Reply("The channel refused it (recorded).", sent)},
    }
    ops = {}
    for route, op_id, reply, body in table:
        method, path = route.split(" ")
        refused = refusals(*(KEYED_BODY if body is not None else (*KEYED, 422)))
        ops[(method, f"/v1/merchants/{{merchant_id}}/{path}")] = Op(
            op_id,
            summaries[op_id],
            "admin",
            {**refused, **ok(reply), **more.get(op_id, {})},
            Body(body) if body is not None else None,
            (LOCALE, VARIANT) if "{milestone}" in path else (),
        )
    return ops


def _hooks() -> dict[tuple[str, str], Op]:
    """A merchant's webhook endpoints (outbound/api.py)."""
    from notifier.outbound import api as h

    base = "/v1/merchants/{merchant_id}/webhook-endpoints"
    one = base + "/{endpoint_id}"
    limit = Param(
        "limit", "query", "attempts to list", {"type": "integer", "minimum": 1, "maximum": 200}
    )
    gone = {204: Reply("Deleted, with its delivery log.", media=())}
    table: list[tuple[str, str, str, str, dict[int, Reply], type[BaseModel] | None]] = [
        (
            "GET",
            base,
            "listWebhookEndpoints",
            "A merchant's webhook endpoints",
            ok(h.EndpointList),
            None,
        ),
        (
            "POST",
            base,
            "createWebhookEndpoint",
            "Subscribe a URL to events (secret shown once)",
            {**ok(h.EndpointReply, status=201), **refusals(409)},
            h.NewEndpoint,
        ),
        ("GET", one, "getWebhookEndpoint", "A webhook endpoint", ok(h.EndpointReply), None),
        (
            "PATCH",
            one,
            "changeWebhookEndpoint",
            "Change an endpoint's URL, events or state",
            {**ok(h.EndpointReply), **refusals(409)},
            h.EndpointChange,
        ),
        ("DELETE", one, "deleteWebhookEndpoint", "Delete an endpoint", gone, None),
        (
            "POST",
            one + "/rotate-secret",
            "rotateWebhookSecret",
            "A new signing secret; the old one signs too for overlap_s",
            {**ok(h.EndpointReply), **refusals(409)},
            h.Rotation,
        ),
        (
            "POST",
            one + "/test",
            "testWebhookEndpoint",
            "Queue a test event for the endpoint",
            ok(h.TestQueued, status=202),
            None,
        ),
        (
            "GET",
            one + "/deliveries",
            "getWebhookDeliveries",
            "An endpoint's latest delivery attempts",
            ok(h.Deliveries),
            None,
        ),
    ]
    ops = {}
    for method, path, op_id, summary, replies, body in table:
        refused = refusals(*(KEYED_BODY if body is not None else (*KEYED, 422)))
        ops[(method, path)] = Op(
            op_id,
            summary,
            "merchant-webhooks",
            {**refused, **replies},
            Body(body) if body is not None else None,
            (limit,) if op_id == "getWebhookDeliveries" else (),
        )
    return ops


def _analytics() -> dict[tuple[str, str], Op]:
    """A merchant's notification counts (insights/api.py)."""
    from notifier.insights import api as a

    day = {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}
    params = (
        Param("from", "query", "first UTC day (default: 29 days before `to`)", day),
        Param("to", "query", "last UTC day (default: today)", day),
        Param(
            "group_by",
            "query",
            "comma-separated: day, milestone, channel, locale, variant (default: the first "
            "four; empty: one row of totals)",
        ),
        Param(
            "format", "query", "json (default) or csv", {"type": "string", "enum": ["json", "csv"]}
        ),
    )
    counts = Reply("The counts, as JSON or as CSV.", (a.Analytics,), (JSON, "text/csv"))
    from notifier.insights import carriers as c
    from notifier.insights import digest_api as d
    from notifier.insights import experiments as x

    return {
        ("GET", "/v1/merchants/{merchant_id}/digest"): Op(
            "getDigest",
            "Who gets the merchant's weekly digest",
            "analytics",
            {**ok(d.DigestSettings), **refusals(*KEYED, 422)},
        ),
        ("PUT", "/v1/merchants/{merchant_id}/digest"): Op(
            "putDigest",
            "Send the weekly digest (Monday from 06:00 UTC, the week before) to these addresses",
            "analytics",
            {**ok(d.DigestSettings), **refusals(*KEYED_BODY)},
            Body(d.DigestSettings),
        ),
        ("DELETE", "/v1/merchants/{merchant_id}/digest"): Op(
            "deleteDigest",
            "Stop the weekly digest",
            "analytics",
            {204: Reply("Stopped.", media=()), **refusals(*KEYED, 422)},
        ),
        ("GET", "/v1/merchants/{merchant_id}/carriers"): Op(
            "getCarrierPerformance",
            "Carrier performance per lane and hub",
            "analytics",
            {**ok(c.CarrierReport), **refusals(*KEYED, 422)},
            None,
            params[:2],
            description="Per carrier and lane (origin -> destination country) of the "
            "shipments delivered in the days: deliveries, first-attempt rate, transit p50/p90 "
            "in hours, the share that met each exception; per carrier and hub, dwell p50/p90.",
        ),
        ("GET", "/v1/merchants/{merchant_id}/experiments"): Op(
            "getExperiments",
            "How each variant of the merchant's A/B tests of messages did",
            "analytics",
            {**ok(x.ExperimentsReport), **refusals(*KEYED, 422)},
            None,
            params[:2],
            description="Each experiment of the policy (and any other counted in the days): "
            "per variant and channel, the messages accepted, failed, delivered, bounced, "
            "opened, clicked, unsubscribed, reported as spam, replied to and STOPped; the "
            "rates of each variant with the p-value of their difference.",
        ),
        ("GET", "/v1/merchants/{merchant_id}/analytics"): Op(
            "getAnalytics",
            "Notification counts per day, milestone, channel and locale",
            "analytics",
            {200: counts, **refusals(*KEYED, 422)},
            None,
            params,
            description="Decided, sent, deferred, suppressed (and by rule), flagged, accepted "
            "by the provider, failed, delivered, bounced, opened, clicked, unsubscribed, spam "
            "reports and STOPs, per UTC day; kept 120 days.",
        ),
    }


def _editor() -> dict[tuple[str, str], Op]:
    """The merchant editor's pages (web/): HTML, forms, a JSON preview for its script."""
    base = "/merchant/{merchant_id}"
    # (method and path under /merchant/{merchant_id}, operation id, summary, form)
    table: list[tuple[str, str, str, type[BaseModel] | None]] = [
        ("GET /", "editorHome", "Overview", None),
        ("GET /messages", "editorMessages", "The messages", None),
        ("GET /messages/{milestone}", "editorMessage", "A message's editor", None),
        ("POST /messages/{milestone}", "editorSaveMessage", "Save a message", m.MessageForm),
        (
            "POST /messages/{milestone}/test-send",
            "editorTestSend",
            "Send a test of a message",
            m.TestSendForm,
        ),
        ("GET /brand", "editorBrand", "The brand form", None),
        ("POST /brand", "editorSaveBrand", "Save the brand form", m.SettingsForm),
        ("GET /cadence", "editorCadence", "The cadence rules form", None),
        ("POST /cadence", "editorSaveCadence", "Save the cadence rules form", m.SettingsForm),
        ("GET /publish", "editorReview", "Review & publish", None),
        ("POST /publish", "editorPublish", "Publish, or drop a file", m.PublishForm),
        ("GET /versions", "editorVersions", "Versions", None),
        ("POST /rollback", "editorRollback", "Restore a version", m.RollbackForm),
        ("GET /timeline", "editorTimeline", "A shipment's timeline", None),
        ("GET /analytics", "editorAnalytics", "How the messages did (a chart, tables)", None),
    ]
    days = (
        Param("from", "query", "first UTC day, YYYY-MM-DD"),
        Param("to", "query", "last UTC day, YYYY-MM-DD"),
    )
    params = {
        "editorAnalytics": days,
        "editorMessage": (LOCALE,),
        "editorTimeline": (
            Param("q", "query", "a shipment id or tracking number"),
            Param("shipment", "query", "one of the shipments found"),
        ),
    }
    ops = {}
    for route, op_id, summary, form in table:
        method, path = route.split(" ")
        ops[(method, base + path)] = Op(
            op_id,
            summary,
            "editor",
            PAGE_GET if method == "GET" else PAGE_POST,
            Body(form, FORM) if form is not None else None,
            params.get(op_id, ()),
            SESSION,
            "Without a session a page redirects to the sign-in page and a form is refused "
            "with 401.",
        )
    forms = refusals(400, 403, 413, media=BOTH)
    not_a_key = {401: Reply("The form again: not a merchant API key.", media=(HTML,))}
    files = {200: Reply("The file.", media=tuple(STATIC.values())), **refusals(404)}
    slash = {308: Reply("To the path with a trailing slash.", media=())}
    unslash = {308: Reply("To the path without the slash (its query kept).", media=())}
    page, go = PAGE | SEE_OTHER, SEE_OTHER | refusals(404, media=BOTH)
    sign_in, sign_out = SEE_OTHER | forms | not_a_key, SEE_OTHER | forms
    # (method and path, operation id, summary, replies, form, query parameters)
    anyone: list[tuple[str, str, str, dict[int, Reply], type[BaseModel] | None, str]] = [
        ("GET /merchant", "editorIndex", "To the overview, or a merchant picker", page, None, ""),
        ("GET /merchant/", "editorIndexSlash", "The same", page, None, ""),
        (f"GET {base}", "editorSlash", "To the overview (with the slash)", slash, None, ""),
        ("GET /merchant/go", "editorGo", "The merchant picker's form", go, None, "merchant"),
        ("GET /merchant/sign-in", "editorSignInForm", "The sign-in form", PAGE, None, "next"),
        ("POST /merchant/sign-in", "editorSignIn", "Sign in", sign_in, m.SignInForm, ""),
        ("GET /merchant/sign-out", "editorSignOutForm", "A sign-out button", page, None, ""),
        ("POST /merchant/sign-out", "editorSignOut", "Sign out", sign_out, m.CsrfForm, ""),
        ("GET /merchant/go/", "editorGoSlash", "The same", unslash, None, ""),
        ("GET /merchant/sign-in/", "editorSignInSlash", "The same", unslash, None, ""),
        ("GET /merchant/sign-out/", "editorSignOutSlash", "The same", unslash, None, ""),
        (
            "GET /merchant/{tail}",
            "editorUnknown",
            "Any other path: without its last slash, or a page saying there is none",
            {**unslash, **refusals(404, media=BOTH)},
            None,
            "",
        ),
        (
            "POST /merchant/{tail}",
            "editorUnknownForm",
            "Any other path: none (the API's 404, as for the preview; 405 for a page's)",
            refusals(404, 405),
            None,
            "",
        ),
        (
            "GET /merchant/-/static/{filename}",
            "editorStatic",
            "Its CSS and script",
            files,
            None,
            "",
        ),
    ]
    for route, op_id, summary, replies, form, query in anyone:
        method, path = route.split(" ")
        ops[(method, path)] = Op(
            op_id,
            summary,
            "editor",
            replies,
            Body(form, FORM) if form is not None else None,
            tuple(Param(name, "query", QUERY[name]) for name in query.split()),
            None,
        )
    ops[("GET", f"{base}/analytics.csv")] = Op(
        "editorAnalyticsCsv",
        "The analytics page's counts as CSV",
        "editor",
        {
            200: Reply(
                "The counts, a row per day, milestone, channel and locale.", media=("text/csv",)
            ),
            **SEE_OTHER,
            **refusals(403, 404, 422, media=BOTH),
        },
        None,
        days,
        SESSION,
    )
    ops[("POST", f"{base}/preview")] = Op(
        "editorPreview",
        "The message editor's live preview (JSON, for its script)",
        "editor",
        {**ok(m.EditorPreview), **refusals(400, 401, 403, 404, 413, 415, 422)},
        Body(m.EditorPreviewRequest),
        (Param("X-CSRF-Token", "header", "the session's CSRF token", required=True),),
        SESSION,
    )
    return ops


#: The query parameters of the editor's pages that need no session.
QUERY = {"merchant": "a merchant id", "next": "an editor page to go to after signing in"}


# -- the document ------------------------------------------------------------------------------
SECURITY_SCHEMES = {
    BEARER: {
        "type": "http",
        "scheme": "bearer",
        "description": "A key of NOTIFIER_API_KEYS (`Authorization: Bearer <key>`); a key "
        "acts only for the merchants it lists.",
    },
    SESSION: {
        "type": "apiKey",
        "in": "cookie",
        "name": COOKIE,
        "description": "The merchant editor's session, opened by signing in with a merchant "
        "API key; forms also carry the session's CSRF token.",
    },
}
REQUEST_ID = {
    "description": "The request's id (the caller's X-Request-ID, or a new one), also in the "
    "log lines it caused.",
    "schema": {"type": "string"},
}


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of ``app``'s routes; ConfigurationError naming any route that
    ``operations()`` does not document."""
    ops = operations()
    schemas, defs = _schemas(ops.values())
    paths: dict[str, dict[str, Any]] = {}
    missing = []
    for resource in app.router.resources():
        path = resource.canonical
        methods = {route.method for route in resource}
        if "HEAD" in methods and "GET" not in methods:
            missing.append(f"HEAD {path}")
        for method in sorted(methods - {"HEAD"}):
            op = ops.get((method, path))
            if op is None:
                missing.append(f"{method} {path}")
            else:
                paths.setdefault(path, {})[method.lower()] = _operation(op, path, schemas)
    if missing:
        raise ConfigurationError(
            "routes without documentation in notifier/openapi.py: " + ", ".join(missing)
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "notifier",
            "version": __version__,
            "description": "Shipment status transitions in, deduplicated email and SMS out. "
            "Every answer carries `X-Request-ID`. HEAD is answered wherever GET is.",
        },
        "tags": [{"name": name} for name in TAGS],
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": SECURITY_SCHEMES,
            "headers": {"RequestId": REQUEST_ID},
        },
    }


TAGS = (
    "ingest",
    "history",
    "opt-outs",
    "admin",
    "merchant-webhooks",
    "analytics",
    "webhooks",
    "unsubscribe",
    "operations",
    "editor",
)
_PATH_PARAM = re.compile(r"\{(\w+)\}")
Mode = JsonSchemaMode
#: The $ref of each model, as a request body (validation) or a reply (serialization).
Refs = dict[tuple[type[BaseModel], Mode], dict[str, Any]]


def _schemas(ops: Iterable[Op]) -> tuple[Refs, dict[str, Any]]:
    """The $ref of every model the operations use (request bodies as validated, replies as
    serialized), and every schema they refer to, for components/schemas."""
    wanted: set[tuple[type[BaseModel], Mode]] = set()
    for op in ops:
        if op.body is not None:
            wanted |= {(model, "validation") for model in (op.body.model, *op.body.alternatives)}
        for reply in op.replies.values():
            wanted |= {(model, "serialization") for model in reply.models}
    ordered = sorted(wanted, key=lambda pair: (pair[0].__name__, pair[1]))
    refs, top = models_json_schema(ordered, ref_template=REF, schema_generator=_Generator)
    return {pair: refs[pair] for pair in ordered}, top.get("$defs", {})


class _Generator(GenerateJsonSchema):
    def time_schema(self, schema: core_schema.TimeSchema) -> dict[str, Any]:
        # pydantic writes clock times as "21:00:00", without the offset that JSON Schema's
        # "time" format (RFC 3339) requires
        return {
            "type": "string",
            "pattern": r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]+)?)?$",
        }


#: Operations that never ask Redis: the others answer 503 while it does not answer.
NO_REDIS = frozenset(
    {
        "metrics",
        "openapi",
        "editorStatic",
        "editorSignInForm",
        "editorSlash",
        "editorGo",
        "editorGoSlash",
        "editorSignInSlash",
        "editorSignOutSlash",
        "editorUnknown",
        "editorUnknownForm",
    }
)


def _operation(op: Op, path: str, schemas: Refs) -> dict[str, Any]:
    params = _path_params()
    out: dict[str, Any] = {"operationId": op.id, "summary": op.summary, "tags": [op.tag]}
    if op.description:
        out["description"] = op.description
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": params[name]}
        for name in _PATH_PARAM.findall(path)
    ]
    parameters += [
        {
            "name": p.name,
            "in": p.where,
            "required": p.required,
            "description": p.description,
            "schema": p.schema,
        }
        for p in op.params
    ]
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        models = (op.body.model, *op.body.alternatives)
        refs = [schemas[(model, "validation")] for model in models]
        schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
        out["requestBody"] = {
            "required": op.body.required,
            "content": {op.body.media: {"schema": schema}},
        }
    replies = op.replies
    if "{" in path and 404 not in replies:
        replies = {**replies, **refusals(404)}  # the router's, for a path it cannot match
    if 503 not in replies and op.id not in NO_REDIS:
        replies = {**replies, **refusals(503)}  # Redis away (app.error_middleware)
    out["responses"] = {
        str(status): _reply(reply, schemas) for status, reply in sorted(replies.items())
    }
    out["security"] = [{op.security: []}] if op.security else []
    return out


def _reply(reply: Reply, schemas: Refs) -> dict[str, Any]:
    out: dict[str, Any] = {"description": reply.description}
    headers: dict[str, Any] = {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}}
    for name, what in reply.headers:
        headers[name] = {"description": what, "schema": {"type": "string"}}
    out["headers"] = headers
    content: dict[str, Any] = {}
    for media in reply.media:
        if media == JSON and reply.models:
            refs = [schemas[(model, "serialization")] for model in reply.models]
            content[media] = {"schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}
        else:
            content[media] = {"schema": {"type": "string"}}
    if content:
        out["content"] = content
    return out


_BUILT: weakref.WeakKeyDictionary[web.Application, bytes] = weakref.WeakKeyDictionary()


async def handler(request: web.Request) -> web.Response:
    """GET /openapi.json: the document, built once per application."""
    body = _BUILT.get(request.app)
    if body is None:
        body = _BUILT[request.app] = orjson.dumps(document(request.app))
    return web.Response(body=body, content_type=JSON)
