"""The API's answers as pydantic models: what the handlers reply with plain dicts, written
down once so that /openapi.json documents them and schemathesis can hold each reply to them.

The handlers build their replies as dicts (the hot path stays orjson); these models are the
contract those dicts keep. ``extra="forbid"`` makes a field added to a reply and not here a
schema violation the fuzz tests catch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from notifier.models import ChannelKind, ExceptionCode, Transition
from notifier.policy.rules import Policy
from notifier.render.brand import Brand
from notifier.store import Admission, LedgerState


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors ----------------------------------------------------------------------------------
class ErrorDetail(_Reply):
    """One problem of a refused request."""

    index: int | None = Field(default=None, description="the batch item it is about")
    field: str = Field(description='the field, dotted ("recipient.phone"), or "(body)"')
    message: str


class ErrorBody(_Reply):
    code: str = Field(description="stable, machine-readable: invalid_transition, forbidden, …")
    message: str = Field(description="for people")
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorReply(_Reply):
    """Every refusal of the JSON API: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorBody


# -- ingest ----------------------------------------------------------------------------------
class IngestResult(_Reply):
    index: int
    event_id: str | None = Field(description="as posted (null when the item had none)")
    status: Admission | Literal["rejected"] = Field(
        description="accepted, duplicate (seen before with the same body), conflict (seen "
        "before with another body: refused) or rejected (invalid, see the error details)"
    )


class IngestReply(_Reply):
    """202: every transition was accepted (or was a duplicate)."""

    accepted: int
    duplicates: int
    results: list[IngestResult]


class IngestRefusal(IngestReply):
    """409/422 for a batch (or a partly valid body): the refusal, and what was accepted."""

    error: ErrorBody
    conflicts: int = Field(default=0, description="items refused as idempotency conflicts")
    rejected: int = Field(default=0, description="invalid items")


# -- shipment history ------------------------------------------------------------------------
class Delivery(_Reply):
    """A message's delivery status from the ledger ({} once the ledger entry expired)."""

    status: LedgerState | None = None
    created_at: str | None = None
    sent_at: str | None = None
    detail: str | None = None
    error: str | None = None
    attempts: int | None = None
    due_at: str | None = None
    provider_status: str | None = Field(default=None, description="the provider's last word")
    provider_error: str | None = None
    summary: str | None = None


class HistoryDecision(_Reply):
    """One decision for one transition on one channel (DESIGN.md §5), or a test send."""

    event_id: str
    status: str = Field(description="the transition's status (a test send: its milestone)")
    exception_code: ExceptionCode | None = None
    channel: ChannelKind | None = None
    outcome: Literal["sent", "deferred", "suppressed", "flagged", "failed"] = Field(
        description='sent, deferred (see send_at), suppressed, flagged; "failed": a test send'
    )
    reason: str
    notification_id: str | None = None
    decided_at: str
    occurred_at: str
    send_at: str | None = None
    details: dict[str, Any] | None = Field(default=None, description="the rule's numbers")
    request_id: str | None = None
    test: bool | None = Field(default=None, description="a test send from the admin API")
    delivery: Delivery | None = None


class PredictionBasis(_Reply):
    carrier: str
    origin: str = Field(description='the origin country, or "*": every origin of the carrier')
    deliveries: int = Field(description="the deliveries it is read from")
    window_days: int = Field(description="how far back the model looks")


class Prediction(_Reply):
    """When the shipment is likely delivered, from the merchant's own deliveries of its
    carrier and origin that took at least as long as it has been under way."""

    delivery_by: str = Field(description="their median")
    latest: str = Field(description="their 90th percentile")
    basis: PredictionBasis
    likely_late: bool | None = Field(
        description="the median after the promised window's end; null without a window"
    )


class HistoryPage(_Reply):
    merchant_id: str
    shipment_id: str
    decisions: list[HistoryDecision]
    total: int = Field(description="decisions ever recorded for the shipment")
    trimmed: int = Field(description="the oldest ones no longer kept")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")
    prediction: Prediction | None = Field(
        default=None,
        description="null when delivered or returned, not yet picked up, or too little known",
    )


# -- operations ------------------------------------------------------------------------------
class DeadLetters(_Reply):
    notifications: int = Field(description="messages that failed for good")
    inbox: int = Field(description="inbox entries that kept failing")


class Health(_Reply):
    status: Literal["ok"]
    redis: Literal["ok"]
    mode: Literal["embedded", "redis"]
    dead_letters: DeadLetters
    merchant_overrides_disabled: int = Field(
        description="merchants whose own files workers found broken within the last day"
    )


class HealthDown(_Reply):
    status: Literal["unavailable"]
    redis: Literal["unreachable"]
    mode: Literal["embedded", "redis"]


class Readiness(_Reply):
    """Each check is "ok" or says what is wrong."""

    status: Literal["ready", "not_ready"]
    queue: str | None = Field(
        default=None,
        description="arq's queue Redis, when it has one of its own (NOTIFIER_QUEUE_REDIS_URL)",
    )
    redis: str
    workers: int | str | None = Field(
        default=None, description="workers alive (absent when Redis does not answer)"
    )
    replicas: str | None = Field(
        default=None,
        description="replicas in sync, with NOTIFIER_INGEST_WAIT_REPLICAS (absent without it)",
    )
    policies: str
    templates: str
    brand: str
    catalogs: str


# -- admin API -------------------------------------------------------------------------------
class Draft(_Reply):
    revision: int
    files: dict[str, str | None] = Field(description="path → new text (null: deleted)")


class Overview(_Reply):
    merchant_id: str
    version: int = Field(description="the published version (0: none)")
    files: dict[str, str]
    draft: Draft


class Saved(_Reply):
    revision: int = Field(description="the draft revision the problems are about")
    saved: int = Field(description="the draft revision after this save")
    problems: list[str] = Field(description="what publishing the draft now would refuse")


class Discarded(_Reply):
    revision: int


class Published(_Reply):
    version: int
    published: bool = Field(description="false: the draft was empty")


class VersionEntry(_Reply):
    version: int
    author: str
    at: str
    changed: list[str]
    restored: int | None
    diff: str


class Versions(_Reply):
    merchant_id: str
    versions: list[VersionEntry]


class RolledBack(_Reply):
    version: int = Field(description="the new version, with the files of the restored one")
    restored: int


class AuditEntry(_Reply):
    at: str
    key_id: str
    action: Literal["save", "delete", "discard", "publish", "rollback"]
    path: str | None = None
    paths: list[str] | None = None
    version: int | None = None
    restored: int | None = None


class Audit(_Reply):
    merchant_id: str
    entries: list[AuditEntry]


class EmailPreview(_Reply):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    channel: Literal["email"]
    subject: str
    preheader: str
    html: str
    text: str
    from_: str = Field(alias="from")


class SmsPreview(_Reply):
    channel: Literal["sms"]
    body: str
    encoding: Literal["GSM-7", "UCS-2"]
    segments: int


class SentTest(_Reply):
    notification_id: str
    event_id: str
    status: str
    channel: ChannelKind
    outcome: Literal["sent", "failed"]
    reason: str
    test: bool
    decided_at: str
    occurred_at: str
    delivery: Delivery


class TemplateEntry(_Reply):
    milestone: str
    locale: str | None = Field(description="null: the text for every locale")
    variant: str = Field(description="a, or b: the message's variant b of an A/B test")
    path: str
    source: str = Field(description="draft, published, files, default")


class Templates(_Reply):
    merchant_id: str
    templates: list[TemplateEntry]


class Template(TemplateEntry):
    text: str


class TemplateText(_Reply):
    """PUT …/templates/{milestone}: the message template's new text."""

    text: str


class BrandView(_Reply):
    merchant_id: str
    brand: Brand | None = Field(description="the effective brand (null: the draft is broken)")
    override: dict[str, Any] = Field(description="the draft's brand.yaml fields")
    problem: str | None


class PolicyView(_Reply):
    merchant_id: str
    policy: Policy | None = Field(description="the effective policy (null: the draft is broken)")
    override: dict[str, Any] = Field(description="the draft's policy.yaml fields")
    problem: str | None


class EditorPreview(_Reply):
    """The merchant editor's live preview: both channels and the template variables."""

    email: EmailPreview
    sms: SmsPreview
    variables: dict[str, str]
    name: str


class EditorPreviewRequest(_Reply):
    path: str = Field(description="the file on screen (messages/delivered.jinja)")
    text: str
    milestone: str
    locale: str = "en"


# -- request bodies that no handler validates with a model of its own ------------------------
class Batch(BaseModel):
    """POST /v1/transitions with several transitions (at most NOTIFIER_MAX_BATCH, 1000)."""

    model_config = ConfigDict(extra="forbid")

    transitions: list[Transition] = Field(min_length=1)


class SignInForm(BaseModel):
    csrf: str = Field(description="the sign-in form's token (also in its cookie)")
    key: str = Field(description="a merchant API key")
    next: str = Field(default="", description="an editor page to go to")


class CsrfForm(BaseModel):
    csrf: str = Field(description="the session's CSRF token, from the page's form")


class MessageForm(CsrfForm):
    text: str = ""
    base: str = Field(default="", description="fingerprint of the text the page showed")
    locale: str = Field(default="", description="empty: the text for every locale")
    action: Literal["save", "discard", "remove"] = "save"


class TestSendForm(CsrfForm):
    """A message page's "Send a test": the template as typed, to an address."""

    channel: Literal["email", "sms"]
    to: str = Field(min_length=3, max_length=254, description="an email address or a phone")
    text: str = Field(default="", description="the template as typed")
    locale: str = Field(default="", description="the text's locale (empty: every locale)")
    variant: Literal["a", "b"] = "a"
    preview_locale: str = Field(default="en", description="the language it is rendered in")


class SettingsForm(CsrfForm):
    """The brand or cadence form: one field per setting (the form's field names)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, str] = Field(init=False)


class PublishForm(CsrfForm):
    revision: str = Field(default="", description="the draft revision the page checked")
    discard: str = Field(default="", description="present: a file to drop from the draft")


class RollbackForm(CsrfForm):
    version: str = Field(description="the version to restore (0: none of the editor's)")
    live: str = Field(default="", description="the version in force the page showed")


class TwilioStatusForm(BaseModel):
    """Twilio's status callback (more fields are sent and signed; these are read)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, str] = Field(init=False)

    MessageSid: str
    MessageStatus: str
    ErrorCode: str = ""
    To: str = ""


class TwilioInboundForm(BaseModel):
    """An SMS to our number, as Twilio posts it (STOP, START, HELP are read)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, str] = Field(init=False)

    From: str
    Body: str


class OneClickForm(BaseModel):
    """RFC 8058: what a mail client's one-click button posts."""

    model_config = ConfigDict(populate_by_name=True)

    list_unsubscribe: Literal["One-Click"] = Field(alias="List-Unsubscribe")


class SendgridEvent(BaseModel):
    """One of SendGrid's events (the fields read; SendGrid sends more)."""

    model_config = ConfigDict(extra="allow")

    event: str = Field(description="processed, delivered, bounce, dropped, unsubscribe, …")
    notification_id: str | None = Field(default=None, description="our custom argument")
    merchant_id: str | None = None
    email: str | None = None
    type: str | None = Field(default=None, description='for a bounce: "blocked" is temporary')
    reason: str | None = None
    response: str | None = None


class SendgridEvents(RootModel[list[SendgridEvent]]):
    """SendGrid's event webhook body: a JSON list of events."""


class Override(RootModel[dict[str, Any]]):
    """The override's fields, merged over the merchant's files and the defaults (the brand
    or policy schema, any subset of it)."""


class OpenApiDocument(BaseModel):
    """An OpenAPI 3.1 document (this one)."""

    model_config = ConfigDict(extra="allow")

    openapi: Literal["3.1.0"]
    info: dict[str, Any]
    paths: dict[str, Any]
