"""Whether a recipient's phone number and email address can be used at all.

The API checks their shape only (it must stay fast); the worker checks them for real
(an answer is kept while its address is among the last ``RECENT`` checked): phone numbers
with libphonenumber's metadata (``phonenumbers``: the number exists in its country's plan
and is not a landline), email addresses with ``email-validator`` (syntax, without DNS).
An unusable address is the reason its channel is skipped, in the history; it is never
sent to a provider.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

import idna
import phonenumbers
from babel.core import get_global
from email_validator import EmailNotValidError, validate_email
from phonenumbers import PhoneMetadata

from notifier.models import E164

#: Addresses whose answer is kept, per kind. A shipment's transitions are checked each
#: time, so this saves the checks (about 60 µs a number, 45 µs an email address) when they
#: come close together: a backlog, a burst. Hours apart, as most do, no cache of a
#: worker's size would still hold them: 65,536 a kind grew the worker by 26 MB once
#: 100,000 shipments went round (8,192: 4 MB), and answered none of them.
RECENT = 8192

#: Quoted parts of email-validator's messages can echo the address: never in a reason.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def phone_problem(number: str) -> str | None:
    """Why ``number`` (E.164) cannot receive an SMS, or None."""
    return _phone(number)[0]


def canonical_phone(number: str) -> str:
    """``number``'s one E.164 spelling (``+330612345678`` -> ``+33612345678``: a national
    prefix after the country code), or ``number`` as it is when it is no valid number. What
    a message goes to and an opt-out is kept under (STOPs arrive from Twilio in it): the
    worker reads a transition's number so, the opt-out API and test sends too."""
    return _phone(number)[1]


def older_phone_spellings(number: str) -> tuple[str, ...]:
    """The spelling an opt-out of ``number`` (E.164) may have been kept under before
    numbers were read into E.164: with its country's national prefix after the country code
    (``+33612345678`` -> ``+330612345678``), as a merchant may have sent it to the opt-out
    API (``store.optouts.spellings`` reads those too)."""
    return _phone(number)[2]


@lru_cache(maxsize=RECENT)
def _phone(number: str) -> tuple[str | None, str, tuple[str, ...]]:
    """(``phone_problem``, ``canonical_phone``, ``older_phone_spellings``) of ``number``,
    from one parse."""
    if not E164.fullmatch(number):
        # libphonenumber reads "tel:+33 6…", trailing text or a NUL as the number: what is
        # sent and matched against opt-outs must be exactly the number
        return "not a phone number in E.164 form, like +33612345678", number, ()
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return "not a phone number", number, ()
    if not phonenumbers.is_valid_number(parsed):
        region = phonenumbers.region_code_for_country_code(parsed.country_code or 0)
        where = f" in {region}" if region and region != "ZZ" else ""
        return f"no such phone number{where} (wrong length or prefix)", number, ()
    canonical = str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))
    home = phonenumbers.region_code_for_number(parsed)
    metadata = PhoneMetadata.metadata_for_region(home) if home else None
    prefix = metadata.national_prefix if metadata is not None else None
    national = phonenumbers.national_significant_number(parsed)
    older = (f"+{parsed.country_code}{prefix}{national}",) if prefix else ()
    if phonenumbers.number_type(parsed) == phonenumbers.PhoneNumberType.FIXED_LINE:
        return "a landline, which cannot receive SMS", canonical, older
    if canonical != number:
        # one not read into canonical_phone's spelling (a recipient kept before it was):
        # an opt-out or a STOP is kept under that spelling, so never sent past one
        problem = "not in E.164 form: a national prefix (such as 0) after the country code"
        return problem, canonical, older
    return None, canonical, older


@lru_cache(maxsize=RECENT)
def email_problem(address: str) -> str | None:
    """Why ``address`` cannot receive an email, or None (syntax only, no DNS lookup)."""
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        return "not a valid email address: " + _QUOTED.sub("…", str(exc))
    return None


@lru_cache(maxsize=RECENT)
def ascii_domain(address: str) -> str:
    """``address`` with its domain in ASCII (IDNA, as email-validator reads it:
    ``anna@müller.de`` is ``anna@xn--mller-kva.de``), so an address whose only non-ASCII
    part is its domain fits a plain RFC 5322 header; unchanged when its domain is ASCII
    already, or has no ASCII form."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    try:
        return f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"
    except idna.IDNAError:
        return address


@lru_cache(maxsize=RECENT)
def phone_zones(number: str) -> tuple[str, ...]:
    """The time zones of ``number``'s country or area, as libphonenumber's data gives them
    (``+33…``: Europe/Paris; ``+64…``: Pacific/Auckland and Pacific/Chatham; ``+1 212…``:
    America/New_York); none for a number it places nowhere. Quiet hours go by these for a
    recipient whose own zone is not known (``policy.engine``)."""
    from phonenumbers import timezone as number_zones

    try:
        parsed = phonenumbers.parse(number)
    except phonenumbers.NumberParseException:
        return ()
    zones = [
        zone
        for zone in number_zones.time_zones_for_number(parsed)
        if zone != number_zones.UNKNOWN_TIMEZONE
    ]
    # those of the number's own country: +61 4… also lists Christmas Island and Cocos, and
    # +7 70… (Kazakhstan) Russia's eleven zones (a black-box run: both then fell back to
    # the policy's zone, and a text went at 03:43 in Sydney)
    region = phonenumbers.region_code_for_number(parsed)
    territory: Mapping[str, str] = get_global("zone_territories")
    if region and (own := [z for z in zones if territory.get(z) == region]):
        zones = own
    elif region and (anywhere := sorted(z for z, t in territory.items() if t == region)):
        zones = anywhere
    return tuple(zones)
