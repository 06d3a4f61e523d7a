"""Provider callbacks: Twilio delivery status and inbound SMS (STOP / START / HELP).

Every request must carry a valid ``X-Twilio-Signature``, computed by Twilio over the
public URL it called (``NOTIFIER_PUBLIC_URL`` + the path) and the form fields: a
missing or wrong signature gets 403 and changes nothing.
"""

from __future__ import annotations

import logging

from aiohttp import web
from twilio.request_validator import RequestValidator
from twilio.twiml.messaging_response import MessagingResponse

from notifier.errors import Forbidden, NotFound
from notifier.models import ChannelKind
from notifier.policy import opt_out_key
from notifier.resources import Resources

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
#: Keywords carriers and Twilio treat as opting out / back in (case-insensitive, whole body).
STOP_WORDS = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"}
START_WORDS = {"START", "YES", "UNSTOP"}
HELP_WORDS = {"HELP", "INFO"}


async def _signed_form(request: web.Request, res: Resources) -> dict[str, str]:
    """The request's form fields, once its Twilio signature is verified (403 otherwise)."""
    token = res.settings.twilio_auth_token
    if not token:
        raise NotFound("Twilio is not configured")
    form = {k: str(v) for k, v in (await request.post()).items()}
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
    nid = await res.store.by_provider_id("twilio", sid) if sid else None
    if nid is not None and status in STATUS_RANK:
        error = form.get("ErrorCode") or None
        await res.store.provider_status(nid, status, STATUS_RANK[status], error)
        if error == "21610":  # the carrier says the recipient opted out
            await res.store.set_opt_out(
                res.store.EVERY_MERCHANT, opt_out_key(ChannelKind.SMS, form.get("To", "")), True
            )
    # 200 even for an unknown sid: Twilio would retry otherwise, and it cannot be fixed there
    return web.Response(status=204)


async def twilio_inbound(request: web.Request, res: Resources) -> web.Response:
    """A recipient texted our number: STOP and START words, HELP."""
    form = await _signed_form(request, res)
    word = form.get("Body", "").strip().upper()
    sender = form.get("From", "")
    reply = MessagingResponse()
    key = opt_out_key(ChannelKind.SMS, sender)
    if word in STOP_WORDS:
        # Twilio itself confirms a STOP to the sender; we only stop using the number.
        await res.store.set_opt_out(res.store.EVERY_MERCHANT, key, True)
    elif word in START_WORDS:
        await res.store.set_opt_out(res.store.EVERY_MERCHANT, key, False)
    elif word in HELP_WORDS:
        reply.message("Parcel updates by SMS. Reply STOP to opt out, START to opt back in.")
    return web.Response(text=str(reply), content_type="application/xml")
