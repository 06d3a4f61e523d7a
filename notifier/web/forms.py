"""The editor's forms and the files they write: brand settings ↔ ``brand.yaml``, cadence
rules ↔ ``policy.yaml``, with the plain-words explanation of every rule.

A form shows the merchant's effective values (its override over its files over the
defaults). Saving writes only what differs from the layer beneath (its files over the
defaults) into the draft, so a later change of a default still reaches the merchant.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from notifier.errors import plain_words
from notifier.models import ChannelKind, ExceptionCode, Status
from notifier.policy.rules import MESSAGE_NAMES

#: Human names of milestones (the editor's UI is English; messages are in every locale).
STATUS_LABELS: dict[str, str] = {
    Status.INFO_RECEIVED: "Label created",
    Status.PICKED_UP: "Shipped (picked up by the carrier)",
    Status.IN_TRANSIT: "In transit",
    Status.ARRIVED_AT_FACILITY: "Arrived at a facility",
    Status.DEPARTED_FACILITY: "Left a facility",
    Status.OUT_FOR_DELIVERY: "Out for delivery",
    Status.DELIVERY_ATTEMPT_FAILED: "Delivery attempt failed",
    Status.AVAILABLE_FOR_PICKUP: "Ready for pickup",
    Status.DELIVERED: "Delivered",
    Status.RETURNED_TO_SENDER: "Returned to sender",
    Status.EXCEPTION: "Any problem (exception)",
}
EXCEPTION_LABELS: dict[str, str] = {
    ExceptionCode.DELAYED: "Delayed",
    ExceptionCode.WEATHER_DELAY: "Weather delay",
    ExceptionCode.CUSTOMS_HOLD: "Held by customs",
    ExceptionCode.ADDRESS_ISSUE: "Address problem",
    ExceptionCode.RECIPIENT_UNAVAILABLE: "Recipient unavailable",
    ExceptionCode.DAMAGED: "Damaged",
    ExceptionCode.LOST: "Lost",
    ExceptionCode.REFUSED: "Refused",
    ExceptionCode.HELD_AT_FACILITY: "Held at a facility",
    ExceptionCode.OTHER: "Other problem",
}


def milestone_label(milestone: str) -> str:
    """``exception:customs_hold`` → "Problem: Held by customs"."""
    if milestone.startswith("exception:"):
        return "Problem: " + EXCEPTION_LABELS.get(milestone.split(":", 1)[1], milestone)
    return STATUS_LABELS.get(milestone, milestone)


def as_yaml(data: Mapping[str, Any], header: str) -> str:
    """``data`` as a YAML file the editor writes (and a person can still read)."""
    body = yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"# {header}\n" + ("" if body.strip() == "{}" else body)


def changes(base: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """What in ``wanted`` differs from ``base``, as a mapping to merge over it."""
    out: dict[str, Any] = {}
    for key, value in wanted.items():
        below = base.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            inner = changes(below, value)
            if inner:
                out[key] = inner
        elif value != below:
            out[key] = value
    return out


_TEST_PARTS = {"name": "test name", "message": "message", "b_percent": "variant b share"}


def cadence_label(name: str) -> str:
    """What the cadence form calls the field an error names (its input's label), for the
    error summary: never the policy file's internal name alone."""
    fields = {n: label for n, label, _, _ in POLICY_FIELDS}
    if name in fields:
        return fields[name]
    parts = name.split(".")
    if parts[0] == "quiet_hours" and len(parts) >= 2 and parts[1] in ("email", "sms"):
        channel = "email" if parts[1] == "email" else "SMS"
        part = {"start": ", from", "end": ", until"}.get(parts[2] if len(parts) > 2 else "", "")
        return f"Quiet hours for {channel}{part}"
    if parts[0] == "experiments" and len(parts) == 3 and parts[1].isdigit():
        return f"A/B test {int(parts[1]) + 1}, {_TEST_PARTS.get(parts[2], parts[2])}"
    if parts[0] == "experiments":
        return "A/B tests"
    if parts[0] == "statuses" and len(parts) >= 2 and parts[1] in STATUS_LABELS:
        return STATUS_LABELS[parts[1]]
    if parts[0] == "exceptions" and len(parts) >= 2 and parts[1] in EXCEPTION_LABELS:
        return "Problem: " + EXCEPTION_LABELS[parts[1]]
    return name


def field_errors(exc: ValidationError) -> dict[str, str]:
    """Pydantic errors by dotted field name (the forms' input names)."""
    out: dict[str, str] = {}
    for e in exc.errors(include_input=False, include_url=False):
        name = ".".join(str(p) for p in e["loc"]) or "(form)"
        out.setdefault(name, plain_words(e))
    return out


# -- brand -----------------------------------------------------------------------------

#: (input name, label, help): the brand form's text fields, in order.
BRAND_FIELDS: list[tuple[str, str, str]] = [
    ("name", "Shop name", "Shown in every message and as the email sender's name."),
    ("logo_url", "Logo URL", "An https:// image; emails show the shop name when empty."),
    (
        "logo_dark_url",
        "Logo URL for dark mode",
        "An https:// image for mail apps in dark mode (light on dark); the logo if empty.",
    ),
    ("logo_alt", "Logo text alternative", "Read aloud instead of the logo; the name if empty."),
    ("accent", "Accent colour", "Buttons and links, as #rrggbb. It must reach 4.5:1 contrast."),
    ("default_locale", "Default language", "For customers whose language has no translation."),
    ("support.url", "Support page", "An https:// page where customers get help."),
    ("support.email", "Support email", "Also the Reply-To of your emails."),
    ("support.phone", "Support phone", "In international form, e.g. +49 30 1234 5678."),
    ("support.hours", "Support hours", "Free text, e.g. Mon–Fri 9:00–18:00."),
    ("footer", "Footer", "Company name and address, shown at the bottom of emails."),
    ("links.reschedule", "Reschedule link", "https:// URL; {tracking_number} is filled in."),
    ("links.change_address", "Change-address link", "https:// URL; {order_number} works too."),
    ("links.pickup", "Pickup link", "https:// URL for collecting from a pickup point."),
    (
        "links.short_base",
        "SMS short-link base",
        "https:// base the tracking number is appended to (e.g. https://acme.link/t/): "
        "used in SMS instead of the carrier's long link, so more fit one segment.",
    ),
]
#: (flag, label): what the merchant really does when something goes wrong; each ticked one
#: is a "What we are doing" line in the matching messages (``Commitments``)
COMMITMENTS: list[tuple[str, str]] = [
    ("customs_documents", "Customs hold: we send customs the shipping documents"),
    ("carrier_follow_up", "Delays, customs, lost parcels: we follow up with the carrier"),
    ("damage_claim", "Damaged parcels: we open a claim with the carrier"),
    ("hold_for_address", "Address problems: we ask the carrier to hold the parcel"),
    ("search_request", "Lost parcels: we ask the carrier to search for it"),
    ("track_returns", "Returns to us: we track the return and act when it arrives"),
    (
        "refunds",
        "Lost, damaged, refused or returned: we replace or refund the order and contact "
        "the customer (without it, those messages ask the customer to contact you)",
    ),
]
CHANNEL_CHOICES = {"email": ["", "outbox", "sendgrid"], "sms": ["", "outbox", "twilio"]}


def get_path(data: Mapping[str, Any], dotted: str) -> Any:
    value: Any = data
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        inner = data.get(part)
        if not isinstance(inner, dict):  # absent, or null in the file
            inner = data[part] = {}
        data = inner
    data[last] = value


def brand_from_form(form: Mapping[str, str], current: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` (the draft's brand, as file data) with the fields a submitted form sets
    (an empty field is unset: null). What the form does not show stays as it is, a field
    within a group too (``links.short_base`` beside the form's links)."""
    out: dict[str, Any] = copy.deepcopy(dict(current))
    for name, _, _ in BRAND_FIELDS:
        # a text box sends its lines with the browser's CRLF: kept as plain newlines
        text = form.get(name, "").replace("\r\n", "\n").replace("\r", "\n").strip()
        _set_path(out, name, text or None)
    if not out.get("name"):
        out["name"] = ""  # reported as "name: too short" rather than "must be a string"
    for kind, choices in CHANNEL_CHOICES.items():
        chosen = form.get(f"channels.{kind}", "")
        _set_path(out, f"channels.{kind}", chosen if chosen in choices and chosen else None)
    out["one_click_unsubscribe"] = form.get("one_click_unsubscribe") == "on"
    for flag, _ in COMMITMENTS:
        _set_path(out, f"commitments.{flag}", form.get(f"commitments.{flag}") == "on")
    return out


# -- cadence rules -----------------------------------------------------------------------

#: (input name, label, unit, explanation): the cadence form's number and text fields.
POLICY_FIELDS: list[tuple[str, str, str, str]] = [
    (
        "dedupe_window_hours",
        "Repeat window",
        "hours",
        "The same milestone is not sent again on a channel within this many hours, even "
        "when the carrier scans it again under a new event id.",
    ),
    (
        "coalesce_seconds",
        "Hold before sending",
        "seconds",
        "Every message waits this long and only the shipment's latest state goes out: an "
        "“out for delivery” overtaken by “delivered” within the hold is never sent. "
        "0 sends at once.",
    ),
    (
        "throttle.trivial_interval_hours",
        "Minor-update spacing",
        "hours",
        "At most one minor update (the rows marked “minor” below) per shipment and channel "
        "in this many hours. Milestones and problems are never held back by it.",
    ),
    (
        "throttle.max_per_shipment_per_day",
        "Daily cap per shipment",
        "messages",
        "No shipment gets more than this many messages, all channels together, in any 24 "
        "hours. Applies to every message; a message it stops is recorded with the reason.",
    ),
    (
        "throttle.max_sms_per_shipment",
        "SMS cap per shipment",
        "SMS",
        "No shipment gets more than this many SMS over its whole journey.",
    ),
    (
        "quiet_hours.default_timezone",
        "Time zone for quiet hours",
        "IANA zone",
        "For customers whose time zone is unknown and whose phone number's country does "
        "not tell it (one spanning many zones, or no number), e.g. Europe/Berlin.",
    ),
    (
        "stalled.no_scan_hours",
        "Stalled after",
        "hours",
        "A shipment with no scan for this long gets one “delayed” message (if enabled).",
    ),
    (
        "stalled.after_window_hours",
        "Late after the window by",
        "hours",
        "…or when its estimated delivery window ended this long ago without a delivery.",
    ),
]
RULE_FLAGS = {
    "trivial": "Minor: spaced out by the minor-update spacing above",
    "break_quiet_hours": "Urgent: sent during quiet hours",
}
_TIME = re.compile(r"([01]?\d|2[0-3]):[0-5]\d")


def _number(text: str) -> Any:
    """A number field's value: an int, a float, else the text (the schema names the
    problem); never infinity or NaN (``1e400``, ``inf``: text, refused as not a number)."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            return text
        return number if math.isfinite(number) else text


def _rule(form: Mapping[str, str], prefix: str) -> dict[str, Any]:
    return {
        "channels": [c.value for c in ChannelKind if form.get(f"{prefix}.{c.value}") == "on"],
        "trivial": form.get(f"{prefix}.trivial") == "on",
        "break_quiet_hours": form.get(f"{prefix}.break_quiet_hours") == "on",
    }


def policy_from_form(
    form: Mapping[str, str], effective: Mapping[str, Any], beneath: Mapping[str, Any]
) -> dict[str, Any]:
    """The whole policy a submitted cadence form asks for (``effective`` fills what the form
    does not show, like anomaly thresholds; ``beneath`` is the policy under the override)."""
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(dict(effective)))  # a deep copy
    for name, *_ in POLICY_FIELDS:
        raw = form.get(name, "")
        _set_path(out, name, raw.strip() if name.endswith("timezone") else _number(raw))
    out["statuses"] = {s.value: _rule(form, f"statuses.{s.value}") for s in Status}
    general = out["statuses"][Status.EXCEPTION.value]
    out["exceptions"] = {}
    for code in ExceptionCode:
        prefix = f"exceptions.{code.value}"
        if form.get(f"{prefix}.inherit") != "on":
            out["exceptions"][code.value] = _rule(form, prefix)
        elif code.value in beneath.get("exceptions", {}):
            # the files beneath give this code a rule of its own, which an override can
            # only replace: with the general one
            out["exceptions"][code.value] = general
    for kind in ChannelKind:
        if form.get(f"quiet_hours.{kind.value}.enabled") == "on":
            window = {
                part: form.get(f"quiet_hours.{kind.value}.{part}", "").strip()
                for part in ("start", "end")
            }
            out["quiet_hours"][kind.value] = window
        else:
            out["quiet_hours"][kind.value] = None
    out["sms_fallback_to_email"] = form.get("sms_fallback_to_email") == "on"
    out["stalled"]["enabled"] = form.get("stalled.enabled") == "on"
    out["stalled"]["predicted_late"] = form.get("stalled.predicted_late") == "on"
    if "experiments.count" in form:
        out["experiments"] = experiments_from_form(form)
    return out


#: an A/B test row of the cadence form that starts a new one
BLANK_TEST: dict[str, Any] = {"name": "", "message": "delivered", "b_percent": 50}
#: the messages an A/B test can vary, as the form offers them: (file name, label)
TEST_MESSAGES = [
    (name, milestone_label(name.replace("exception_", "exception:", 1))) for name in MESSAGE_NAMES
]


def experiments_from_form(form: Mapping[str, str]) -> list[dict[str, Any]]:
    """The A/B tests of the cadence form's rows (a row without a name is none)."""
    rows = _number(form.get("experiments.count", "0"))
    out = []
    for i in range(min(rows, 51) if isinstance(rows, int) else 0):
        name = form.get(f"experiments.{i}.name", "").strip()
        if name:
            out.append(
                {
                    "name": name,
                    "message": form.get(f"experiments.{i}.message", ""),
                    "b_percent": _number(form.get(f"experiments.{i}.b_percent", "")),
                }
            )
    return out


def policy_as_data(policy: Any) -> dict[str, Any]:
    """A Policy as the plain data of a policy file (times as HH:MM)."""
    data: dict[str, Any] = policy.model_dump(mode="json")
    for window in (data["quiet_hours"].get("email"), data["quiet_hours"].get("sms")):
        if window:
            for part in ("start", "end"):
                window[part] = window[part][:5]
    return data


def quiet_window_ok(text: str) -> bool:
    return bool(_TIME.fullmatch(text))
