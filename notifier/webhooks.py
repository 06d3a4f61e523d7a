"""Provider callbacks: Twilio delivery status and inbound SMS (STOP / START / HELP, and
replies, counted for the last message sent to the number), and
SendGrid's signed event webhook.

Twilio requests must carry a valid ``X-Twilio-Signature``, computed over the public URL it
called (``NOTIFIER_PUBLIC_URL`` + the path) and the form fields; SendGrid's an ECDSA
signature over timestamp + body, checked with the key in
``NOTIFIER_SENDGRID_WEBHOOK_PUBLIC_KEY``. A missing or wrong signature gets 403 and changes
nothing.
"""

from __future__ import annotations

import binascii
import logging
import time
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError
from sendgrid.helpers.eventwebhook import EventWebhook
from twilio.request_validator import RequestValidator
from twilio.twiml.messaging_response import MessagingResponse

from notifier.channels.twilio import UNDELIVERABLE_CODES
from notifier.delivery import fall_back_later
from notifier.errors import BadRequest, ConfigurationError, Forbidden, NotFound
from notifier.insights import record
from notifier.insights.counts import DIGEST_PREFIX, UNKNOWN, Count, recipient_digest, untag
from notifier.models import ChannelKind, one_line
from notifier.outbound import events as hook_events
from notifier.policy import opt_out_key
from notifier.resources import Resources
from notifier.store.ledger import LastSms

log = logging.getLogger(__name__)

#: Twilio's message statuses in the order they happen; terminal ones share the last rank.
STATUS_RANK = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "delivered": 4,
    "undelivered": 4,
    "failed": 4,
    "read": 5,
    "canceled": 4,
}
#: Keywords carriers and Twilio treat as opting out / back in (case-insensitive, whole body):
#: Twilio's own opt-out words for long codes (it stops sending to the number on each of them)
STOP_WORDS = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
START_WORDS = {"START", "YES", "UNSTOP"}
HELP_WORDS = {"HELP", "INFO"}


async def _signed_form(request: web.Request, res: Resources) -> dict[str, str]:
    """The request's form fields, once its Twilio signature is verified (403 otherwise)."""
    token = res.settings.twilio_auth_token
    if not token:
        raise NotFound("Twilio is not configured")
    try:
        form = {k: str(v) for k, v in (await request.post()).items()}
    except (ValueError, LookupError) as exc:  # a multipart body without boundary, a charset
        raise BadRequest(f"the form could not be read: {exc}") from exc
    url = res.settings.public_url.rstrip("/") + request.path_qs
    signature = request.headers.get("X-Twilio-Signature", "")
    if not signature or not RequestValidator(token).validate(url, form, signature):
        log.warning("Twilio webhook %s with a bad or missing signature", request.path)
        raise Forbidden("invalid Twilio signature")
    return form


async def twilio_status(request: web.Request, res: Resources) -> web.Response:
    """Delivery status of a message we sent: never moves backwards."""
    form = await _signed_form(request, res)
    sid, status = form.get("MessageSid", ""), form.get("MessageStatus", "").lower()
    found = await res.store.by_provider_id("twilio", sid) if sid else None
    if found is not None and status in STATUS_RANK:
        error = form.get("ErrorCode") or None
        nid, scope, where = found
        await res.store.provider_status(nid, status, STATUS_RANK[status], error, scope, where)
        key = opt_out_key(ChannelKind.SMS, form.get("To", ""))
        # the carrier says the recipient opted out: for every merchant, as a STOP; the
        # merchant whose message found it out is told
        opted = error == "21610" and await res.store.set_opt_out(
            res.store.EVERY_MERCHANT, key, True
        )
        if where is not None:
            merchant, shipment = where
            reported = [SMS_COUNTS.get(status), Count.STOPS if error == "21610" else None]
            for counted in (c for c in reported if c is not None):
                tag = request.query.get("stats")
                at = res.clock()
                await record.report(res.store, merchant, shipment, nid, "sms", tag, counted, at)
            if opted:
                await res.hooks.opted_out(merchant, key, "twilio_blocked", res.clock(), shipment)
            if status in SMS_FAILED:
                reason = f"Twilio: {status}" + (f" (error {error})" if error else "")
                event = hook_events.delivery_failed(
                    merchant, shipment, nid, "sms", reason, res.clock(), res.settings.public_url
                )
                await res.hooks.emit(merchant, shipment, event, res.clock())
                gone = UNDELIVERABLE_CODES.get(int(error)) if error and error.isdigit() else None
                if gone is not None:
                    # (a redelivered callback finds the email made: never twice)
                    why = f"Twilio: {status}, error {error}: {gone}"
                    await fall_back_later(res, merchant, shipment, nid, why)
    # 200 even for an unknown sid: Twilio would retry otherwise, and it cannot be fixed there
    return web.Response(status=204)


async def twilio_inbound(request: web.Request, res: Resources) -> web.Response:
    """A recipient texted our number: STOP and START words, HELP."""
    form = await _signed_form(request, res)
    word = form.get("Body", "").strip().upper()
    sender = form.get("From", "")
    reply = MessagingResponse()
    key = opt_out_key(ChannelKind.SMS, sender)
    # the message a STOP or a reply answers: the last one sent to the number (within a week)
    counted = word in STOP_WORDS or (bool(word) and word not in START_WORDS | HELP_WORDS)
    last = await _last_sms(res, sender) if counted else None
    if word in STOP_WORDS:
        # Twilio itself confirms a STOP to the sender; we only stop using the number.
        new = await res.store.set_opt_out(res.store.EVERY_MERCHANT, key, True)
        if last is not None and new:  # a STOP repeated is no new one
            # counted under the message it answers, and its merchant is told
            await _count_reply(res, last, Count.STOPS)
            at = res.clock()
            await res.hooks.opted_out(last.merchant_id, key, "sms_stop", at, last.shipment_id)
    elif word in START_WORDS:
        await res.store.set_opt_out(res.store.EVERY_MERCHANT, key, False)
    elif word in HELP_WORDS:
        reply.message(await _help_text(res, sender))
    elif word and last is not None:
        await _count_reply(res, last, Count.REPLIES)
    return web.Response(text=str(reply), content_type="application/xml")


async def _help_text(res: Resources, number: str) -> str:
    """HELP's answer: who sends these messages and how to reach them (US carriers' rules ask
    for both: the merchant of the last SMS to the number, and its support contact), then
    STOP and START; in the language that SMS was written in (``sms/help.txt``). Without a
    known merchant, the program alone; in English when the template fails."""
    last = await _last_sms(res, number)
    merchant, name, locale, contact = "", "", None, ""
    if last is not None:
        try:
            brand = res.renderer.brand(last.merchant_id)
        except ConfigurationError:  # (a brand that does not load: the program alone)
            brand = None
        if brand is not None:
            merchant, name = last.merchant_id, one_line(brand.name)
            contact = brand.support.phone or brand.support.email or brand.support.url or ""
            tagged = untag(last.stats_tag)[1]
            locale = tagged if tagged != UNKNOWN else None
    try:
        return res.renderer.help_reply(merchant, locale, contact)
    except Exception as exc:  # a HELP is always answered: the English words then
        log.error("the HELP answer did not render (%s): answered in English", type(exc).__name__)
        program = f"{name}: parcel updates by SMS." if name else "Parcel updates by SMS."
        help_ = f" Help: {contact}." if contact else ""
        return f"{program}{help_} Reply STOP to opt out, START to opt back in."


async def _last_sms(res: Resources, number: str) -> LastSms | None:
    """The last SMS sent to ``number``; None when none is known, or Redis fails (a reply
    is then not counted: its STOP or START still holds)."""
    if not number:
        return None
    try:
        secret = await res.digest_secret()
        return await res.store.last_sms(recipient_digest(secret, number))
    except (RedisError, OSError) as exc:
        log.warning("a reply's message not found: Redis failed (%s)", type(exc).__name__)
        return None


async def _count_reply(res: Resources, last: LastSms, count: Count) -> None:
    """Count a reply to ``last`` in its merchant's analytics, once per message and day."""
    await record.report(
        res.store,
        last.merchant_id,
        last.shipment_id,
        last.notification_id,
        "sms",
        last.stats_tag,
        count,
        res.clock(),
    )


#: Twilio statuses that end a message undelivered
SMS_FAILED = frozenset({"failed", "undelivered"})
#: what a Twilio status counts as in a merchant's analytics
SMS_COUNTS = {"delivered": Count.DELIVERED, "failed": Count.BOUNCED, "undelivered": Count.BOUNCED}
#: what a SendGrid event counts as in a merchant's analytics (a hard bounce: see below)
EMAIL_COUNTS = {
    "delivered": Count.DELIVERED,
    "dropped": Count.BOUNCED,
    "open": Count.OPENED,
    "click": Count.CLICKED,
    "unsubscribe": Count.UNSUBSCRIBED,
    "group_unsubscribe": Count.UNSUBSCRIBED,
    "spamreport": Count.SPAM_REPORTS,
}
#: SendGrid event types in the order they can happen to a message (terminal ones last).
EMAIL_RANK = {
    "processed": 1,
    "deferred": 2,
    "delivered": 4,
    "bounce": 4,
    "dropped": 4,
    "spamreport": 5,
    "unsubscribe": 5,
    "group_unsubscribe": 5,
}
EMAIL_OPT_OUTS = {"spamreport", "unsubscribe", "group_unsubscribe"}
#: Signed events older (or newer) than this are refused: a replayed request.
MAX_SKEW_S = 600


async def sendgrid_events(request: web.Request, res: Resources) -> web.Response:
    """SendGrid's event webhook: delivery status; unsubscribes, spam reports, hard bounces
    and drops stop emails to the address (for that merchant)."""
    key = res.settings.sendgrid_webhook_public_key
    if not key:
        raise Forbidden("SendGrid events are refused: NOTIFIER_SENDGRID_WEBHOOK_PUBLIC_KEY unset")
    try:
        # the bytes as UTF-8, whatever charset the request claims (a bogus one was a 500)
        body = (await request.read()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"SendGrid events must be UTF-8 JSON: byte 0x{exc.object[exc.start]:02x} at "
            f"position {exc.start} is not"
        ) from None
    signature = request.headers.get("X-Twilio-Email-Event-Webhook-Signature", "")
    stamp = request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp", "")
    try:
        valid = bool(signature and stamp) and EventWebhook(key).verify_signature(
            body, signature, stamp
        )
    except (ValueError, binascii.Error, TypeError):
        valid = False
    if not valid or not stamp.isdigit() or abs(time.time() - int(stamp)) > MAX_SKEW_S:
        log.warning("SendGrid event webhook with a bad, missing or stale signature")
        raise Forbidden("invalid SendGrid signature")
    try:
        events: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("SendGrid events must be a JSON list") from exc
    if not isinstance(events, list):
        raise BadRequest(f"SendGrid events must be a JSON list, not {_json_kind(events)}")
    for event in events:
        await _email_event(res, event)
    return web.Response(status=204)


def _json_kind(value: Any) -> str:
    """What a JSON value is, in a problem's words."""
    kinds = {dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


async def _email_event(res: Resources, event: Any) -> None:
    if not isinstance(event, dict):
        return
    kind, nid = str(event.get("event", "")), event.get("notification_id")
    if not isinstance(nid, str) or nid.startswith(DIGEST_PREFIX):
        return  # not ours, or the merchant's own digest (no customer's message)
    merchant_id, shipment_id = event.get("merchant_id"), event.get("shipment_id")
    counted = EMAIL_COUNTS.get(kind)
    if kind == "bounce" and event.get("type") != "blocked":
        counted = Count.BOUNCED

    async def count(what: Count) -> None:
        if isinstance(merchant_id, str):
            shipment = shipment_id if isinstance(shipment_id, str) else None
            stats_tag = event.get("stats")
            await record.report(
                res.store, merchant_id, shipment, nid, "email", stats_tag, what, res.clock()
            )

    # an unsubscribe counts once an address: when it opts out (below), so SendGrid's report
    # of one made through our own link, or of one already made, is not a second
    if counted is not None and counted is not Count.UNSUBSCRIBED:
        await count(counted)
    if kind not in EMAIL_RANK:
        return  # an open or a click: counted only
    reason = event.get("reason") or event.get("response")
    merchant, shipment = event.get("merchant_id"), event.get("shipment_id")
    where: tuple[str, str] | None = None
    if isinstance(merchant, str) and isinstance(shipment, str):
        where = (merchant, shipment)
        scope = res.store.scope_of(merchant, shipment)
    else:
        # sent before the shipment went with it (0.5): by SendGrid's message id, if at all
        sg_id = str(event.get("sg_message_id", "")).split(".", 1)[0]
        found = await res.store.by_provider_id("sendgrid", sg_id)
        if found is None and res.store.cluster:
            return
        scope, where = (found[1], found[2]) if found else (None, None)
    why = str(reason) if reason else None
    await res.store.provider_status(nid, kind, EMAIL_RANK[kind], why, scope, where)
    if where is not None and (
        kind == "dropped" or (kind == "bounce" and event.get("type") != "blocked")
    ):
        reason_text = f"SendGrid: {kind}" + (f" ({why})" if why else "")
        failed = hook_events.delivery_failed(
            where[0], where[1], nid, "email", reason_text, res.clock(), res.settings.public_url
        )
        await res.hooks.emit(where[0], where[1], failed, res.clock())
    if await _stop_emails(res, event, kind, where) and counted is Count.UNSUBSCRIBED:
        await count(counted)


#: SendGrid's reasons for a drop that are about the address itself (lower case)
ADDRESS_DROPS = frozenset(
    {"bounced address", "invalid", "unsubscribed address", "spam reporting address"}
)


async def _stop_emails(
    res: Resources, event: dict[str, Any], kind: str, where: tuple[str, str] | None
) -> bool:
    """Opt the event's address out of the merchant's emails when the event says it must not
    be used again; whether it opted out now (not before)."""
    # A hard bounce or a drop (SendGrid's own suppression) means the address must not be
    # used again; a "blocked" bounce is the receiving server's temporary refusal.
    hard_bounce = kind == "bounce" and event.get("type") != "blocked"
    # A drop for the address (SendGrid's reasons "Bounced Address", "Invalid", "Unsubscribed
    # Address", "Spam Reporting Address"), not one for the message ("Invalid SMTPAPI header",
    # "Spam Content", a quota): those say nothing about the address, and an opt-out is for good.
    reason_text = " ".join(str(event.get("reason") or "").lower().split())
    address_drop = kind == "dropped" and reason_text in ADDRESS_DROPS
    merchant, address = event.get("merchant_id"), event.get("email")
    stop = kind in EMAIL_OPT_OUTS or hard_bounce or address_drop
    if not (stop and isinstance(merchant, str) and isinstance(address, str)):
        return False
    key = opt_out_key(ChannelKind.EMAIL, address)
    if not await res.store.set_opt_out(merchant, key, True):
        return False
    source = f"sendgrid_{kind}"
    await res.hooks.opted_out(merchant, key, source, res.clock(), where[1] if where else None)
    return True
