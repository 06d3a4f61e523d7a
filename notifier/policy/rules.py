"""Policy files: policies/default.yaml merged with policies/<merchant_id>.yaml, schema-validated.

An invalid file is refused with an error naming the file, the path inside it
and the problem, e.g. ``policies/acme.yaml: quiet_hours.sms.start: must be HH:MM``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from datetime import time, timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from notifier.errors import ConfigurationError, plain_words
from notifier.models import ChannelKind, ExceptionCode, Status, known_timezone

log = logging.getLogger(__name__)


def _clock_time(value: object) -> object:
    if isinstance(value, str):
        if not re.fullmatch(r"([01]?\d|2[0-3]):[0-5]\d", value):
            raise ValueError("must be HH:MM, 24-hour clock, e.g. 21:00")
        hours, minutes = value.split(":")
        return time(int(hours), int(minutes))
    if isinstance(value, time):
        return value
    raise ValueError("must be HH:MM, 24-hour clock, e.g. 21:00")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads an unquoted 21:00 as the integer 1260 (base 60); here it stays text."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(
        r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"
    ),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


ClockTime = Annotated[time, BeforeValidator(_clock_time)]


class _Strict(BaseModel):
    # no inf or nan: a number a policy uses must be one (inf hours overflowed the stall clock)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Rule(_Strict):
    """What one status (or exception code) does."""

    #: channels that carry it; empty = recorded, never notified
    channels: list[ChannelKind] = Field(default_factory=list)

    @field_validator("channels")
    @classmethod
    def _unique(cls, value: list[ChannelKind]) -> list[ChannelKind]:
        if len(set(value)) != len(value):
            raise ValueError("a channel is listed twice")
        return value

    #: a trivial update: throttled per channel by ``throttle.trivial_interval_hours``
    trivial: bool = False
    #: may be sent during quiet hours instead of waiting for them to end
    break_quiet_hours: bool = False


class QuietWindow(_Strict):
    """Local clock times in the recipient's time zone; ``start`` after ``end`` spans midnight."""

    start: ClockTime
    end: ClockTime

    @model_validator(mode="after")
    def _not_empty(self) -> QuietWindow:
        if self.start == self.end:
            raise ValueError("start and end are equal; leave the channel out for no quiet hours")
        return self


class QuietHours(_Strict):
    """Per-channel quiet hours; a message inside them is deferred to their end."""

    email: QuietWindow | None = None
    sms: QuietWindow | None = None
    #: used for recipients whose transitions carry no time zone
    default_timezone: str = "UTC"

    @field_validator("default_timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        # a field's own check, so that a form can mark the field
        if not known_timezone(value):
            raise ValueError(f"{value!r} is not an IANA zone (such as Europe/Paris)")
        return value

    def window(self, channel: ChannelKind) -> QuietWindow | None:
        return self.email if channel is ChannelKind.EMAIL else self.sms


def _milestone(entry: object) -> object:
    """A status, an exception code or ``exception:<code>`` as its milestone key (YAML reads
    ``exception: lost``, with a space, as a one-pair mapping: taken as meant)."""
    if isinstance(entry, dict) and len(entry) == 1:
        [(key, code)] = entry.items()
        if key == Status.EXCEPTION and isinstance(code, str):
            entry = f"{key}:{code}"
    text = entry.strip() if isinstance(entry, str) else None
    if text in Status.__members__.values():
        return text
    code = text.removeprefix(f"{Status.EXCEPTION}:") if text else None
    if code in ExceptionCode.__members__.values():
        return f"{Status.EXCEPTION}:{code}"
    raise ValueError(
        f"{entry!r} is neither a status ({', '.join(Status)}) nor an exception code "
        f"({', '.join(ExceptionCode)}; alone or as exception:<code>)"
    )


class Throttle(_Strict):
    """Limits that keep a shipment from becoming noise."""

    #: minimum hours between two trivial updates of one shipment on one channel
    trivial_interval_hours: float = Field(default=24, ge=0, le=30 * 24)
    #: at most this many messages per shipment (all channels) in any 24 hours
    max_per_shipment_per_day: int = Field(default=10, ge=1, le=1000)
    #: at most this many SMS per shipment, ever
    max_sms_per_shipment: int = Field(default=8, ge=0, le=1000)
    #: what the daily cap never stops, as statuses and exception codes (``address_issue``
    #: or ``exception:address_issue``; ``exception`` is every code): how the journey ended,
    #: a parcel waiting to be collected, an address to confirm (silence there sends it back)
    daily_cap_exempt: list[str] = Field(
        default_factory=lambda: [
            "available_for_pickup",
            "delivered",
            "returned_to_sender",
            "exception:address_issue",
        ]
    )

    @field_validator("daily_cap_exempt", mode="before")
    @classmethod
    def _milestones(cls, value: object) -> object:
        """Each entry as the milestone key it names ("delivered", "exception:lost")."""
        if not isinstance(value, list):
            return value
        return [_milestone(entry) for entry in value]

    def exempt(self, status: Status, milestone: str) -> bool:
        """Whether the daily cap lets this status or milestone through."""
        return status in self.daily_cap_exempt or milestone in self.daily_cap_exempt


class Anomalies(_Strict):
    """Events that look wrong are flagged and recorded, never notified."""

    #: an event dated more than this far in the future
    future_minutes: float = Field(default=30, ge=0, le=30 * 24 * 60)
    #: an event more than this much earlier than the shipment's first known event
    early_hours: float = Field(default=30 * 24, ge=0, le=10 * 365 * 24)
    #: two located scans implying a faster journey than this
    max_speed_kmh: float = Field(default=1000, gt=0, le=100_000)
    #: jumps shorter than this are never flagged (scan-location jitter)
    min_jump_km: float = Field(default=50, ge=0, le=20_000)


class Stalled(_Strict):
    """One proactive ``exception/delayed`` message when a shipment stops moving."""

    enabled: bool = True
    #: also when the predicted delivery (the merchant's own history) falls after the end of
    #: the estimated delivery window, before it ends
    predicted_late: bool = False
    #: no scan for this long while in one of ``statuses``
    no_scan_hours: float = Field(default=72, gt=0, le=90 * 24)
    #: the estimated delivery window ended this long ago without delivery
    after_window_hours: float = Field(default=2, ge=0, le=90 * 24)
    statuses: list[Status] = Field(
        default_factory=lambda: [
            Status.PICKED_UP,
            Status.IN_TRANSIT,
            Status.ARRIVED_AT_FACILITY,
            Status.DEPARTED_FACILITY,
            Status.OUT_FOR_DELIVERY,
        ]
    )

    @field_validator("statuses")
    @classmethod
    def _open_statuses(cls, value: list[Status]) -> list[Status]:
        ended = sorted(str(s) for s in set(value) & {Status.DELIVERED, Status.RETURNED_TO_SENDER})
        if ended:
            raise ValueError(f"a shipment that is {' or '.join(ended)} cannot stall")
        return value


#: the message files an experiment can vary (``templates/messages/<name>.jinja``), in the
#: order of a journey
MESSAGE_NAMES = tuple(
    [s.value for s in Status if s is not Status.EXCEPTION]
    + [f"exception_{c.value}" for c in ExceptionCode]
)
#: what a variant of a message is called (the b file: ``messages/<name>.b.jinja``)
VARIANTS = ("a", "b")


#: an experiment's name (it is part of the analytics' count keys: ``insights.counts``)
_EXPERIMENT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")


class Experiment(_Strict):
    """An A/B test of one message: a share of shipments get its variant b
    (``messages/<message>.b.jinja``), the others its usual file (variant a). Which one is
    fixed per shipment by ``name``: a shipment reads the same variant on every channel and
    every time, and a new name draws the shipments anew."""

    #: what the experiment is called in the analytics (and what draws the shipments)
    name: str = Field(json_schema_extra={"pattern": f"^{_EXPERIMENT_NAME.pattern}$"})
    #: the message it varies: its file name (delivered, exception_customs_hold...)
    message: str
    #: the percentage of shipments that get variant b (0 ends it: everyone reads a)
    b_percent: int = Field(ge=0, le=100)

    @field_validator("name")
    @classmethod
    def _named(cls, value: str) -> str:
        if not _EXPERIMENT_NAME.fullmatch(value):
            raise ValueError(
                "must be 1 to 40 lowercase letters, digits and hyphens, starting with a letter "
                "or digit (such as delivered-short)"
            )
        return value

    @field_validator("message")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in MESSAGE_NAMES:
            raise ValueError(f"no message {value!r}: one of {', '.join(sorted(MESSAGE_NAMES))}")
        return value

    def variant(self, merchant_id: str, shipment_id: str) -> str:
        """The variant a shipment reads: the same for every call, spread evenly."""
        raw = f"{self.name}\x00{merchant_id}\x00{shipment_id}".encode()
        draw = int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") % 10_000
        return "b" if draw < self.b_percent * 100 else "a"


class Policy(_Strict):
    """The cadence rules for one merchant (see policies/default.yaml for the meaning of each)."""

    statuses: dict[Status, Rule] = Field(default_factory=dict)
    exceptions: dict[ExceptionCode, Rule] = Field(default_factory=dict)
    #: the same milestone is not re-notified on a channel within this many hours
    dedupe_window_hours: float = Field(default=168, ge=0, le=30 * 24)
    #: an event older than this when it is decided is recorded, not sent (an import of old
    #: shipments, a backlog replayed years later): old news, and its date reads as upcoming
    stale_after_hours: float = Field(default=168, ge=24, le=365 * 24)
    #: hold every message this long and send only the latest state (0 = send at once)
    coalesce_seconds: float = Field(default=0, ge=0, le=3600)
    throttle: Throttle = Field(default_factory=Throttle)
    quiet_hours: QuietHours = Field(default_factory=QuietHours)
    anomalies: Anomalies = Field(default_factory=Anomalies)
    stalled: Stalled = Field(default_factory=Stalled)
    #: when an SMS fails for good (bad number, STOP), send the email version instead
    sms_fallback_to_email: bool = True
    #: A/B tests of messages, at most one per message
    experiments: list[Experiment] = Field(default_factory=list, max_length=50)

    @model_validator(mode="after")
    def _stalls_before_old(self) -> Self:
        if self.stalled.no_scan_hours > self.stale_after_hours:
            raise ValueError(
                f"stalled.no_scan_hours ({self.stalled.no_scan_hours:g}) must not pass "
                f"stale_after_hours ({self.stale_after_hours:g}): a stalled shipment's scan "
                "would be old news by then"
            )
        return self

    @field_validator("experiments")
    @classmethod
    def _one_each(cls, value: list[Experiment]) -> list[Experiment]:
        for attr, what in (("name", "name"), ("message", "message")):
            seen = [getattr(e, attr) for e in value]
            twice = sorted({x for x in seen if seen.count(x) > 1})
            if twice:
                raise ValueError(f"two experiments with the {what} {twice[0]!r}")
        return value

    @cached_property
    def experiment_of(self) -> dict[str, Experiment]:
        """The experiment of each message that has one."""
        return {e.message: e for e in self.experiments}

    @cached_property
    def dedupe_window(self) -> timedelta:
        return timedelta(hours=self.dedupe_window_hours)

    @cached_property
    def stale_after(self) -> timedelta:
        return timedelta(hours=self.stale_after_hours)

    @cached_property
    def trivial_interval(self) -> timedelta:
        return timedelta(hours=self.throttle.trivial_interval_hours)

    def rule(self, status: Status, code: ExceptionCode | None) -> Rule:
        """The rule for a transition: its exception code's, else its status's, else silence."""
        if code is not None and code in self.exceptions:
            return self.exceptions[code]
        return self.statuses.get(status, _SILENT)


_SILENT = Rule()


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings: a merchant file overrides the defaults key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: not UTF-8 text (save it as UTF-8)") from exc
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read: {exc.strerror}") from exc
    return _parse_yaml(text, path)


def _parse_yaml(text: str, path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: the top level must be a mapping")
    return data


def _validate(path: Path, data: dict[str, Any]) -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {plain_words(err)}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigurationError(f"{path}: {problems}") from exc


def override_label(name: str, merchant_id: str, draft: bool) -> str:
    """How a problem names a merchant's override file: its draft's, or the published one."""
    return f"{name} of {merchant_id}'s draft" if draft else f"published {name} of {merchant_id}"


class PolicyStore:
    """Layered policy lookup (merchant file over defaults), reloaded when a file changes.

    Running workers pick up edits within a lookup: each lookup compares the files'
    modification times with those the cached policy was built from. An edit that
    breaks a merchant's file is logged and its last good policy stays in force; a
    merchant whose file was never valid gets the default policy (logged). Only broken
    defaults raise ConfigurationError.
    """

    def __init__(
        self,
        directory: Path,
        published: Callable[[str], dict[str, str]] | None = None,
        draft: bool = False,
    ) -> None:
        self.directory = directory
        #: a merchant's published override files: its policy.yaml (the editor's) over its file
        self.published = published
        #: ``published`` is a draft being checked, not yet published (its problems say so)
        self.draft = draft
        self._cache: dict[str, tuple[tuple[float, float], Policy]] = {}
        self._lock = threading.Lock()

    def default_path(self) -> Path:
        return self.directory / "default.yaml"

    def _stamp(self, merchant_id: str) -> tuple[float, float]:
        def mtime(path: Path) -> float:
            try:
                return path.stat().st_mtime
            except OSError:
                return -1.0

        merchant = self.directory / f"{merchant_id}.yaml" if merchant_id else None
        return mtime(self.default_path()), mtime(merchant) if merchant else -1.0

    def for_merchant(self, merchant_id: str) -> Policy:
        """The merged policy for ``merchant_id`` (cached until a file changes)."""
        stamp = self._stamp(merchant_id)
        cached = self._cache.get(merchant_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            policy = self._load(merchant_id)
        except ConfigurationError as exc:
            if not merchant_id:
                raise  # the defaults themselves: nothing to fall back on
            # One merchant's broken file never stops its messages: its last good policy,
            # or the defaults when it never had one, until the file is fixed.
            used = "its last good policy" if cached is not None else "the default policy"
            log.error("%s; %s is used for merchant %s until it is fixed", exc, used, merchant_id)
            policy = cached[1] if cached is not None else self.for_merchant("")
        with self._lock:
            self._cache[merchant_id] = (stamp, policy)
        return policy

    def strict(self, merchant_id: str) -> Policy:
        """The merged policy, or ConfigurationError naming the problem (no fallback, no
        cache): what checks use."""
        return self._load(merchant_id)

    def layered(self, merchant_id: str, under: dict[str, Any]) -> dict[str, Any]:
        """``under`` (a policy's file data) with the merchant's override policy.yaml over it,
        not validated: what the editor's form shows of a draft that does not validate, so
        saving the form keeps the draft's values (ConfigurationError when its YAML does not
        even read)."""
        text = self.published(merchant_id).get("policy.yaml") if self.published else None
        if not merchant_id or text is None:
            return under
        where = Path(override_label("policy.yaml", merchant_id, self.draft))
        return _merge(under, _parse_yaml(text, where))

    def invalidate(self, merchant_id: str | None = None) -> None:
        """Forget cached policies (one merchant, or all)."""
        with self._lock:
            if merchant_id is None:
                self._cache.clear()
            else:
                self._cache.pop(merchant_id, None)

    def _load(self, merchant_id: str) -> Policy:
        base = _read_yaml(self.default_path())
        path = self.directory / f"{merchant_id}.yaml"
        text = self.published(merchant_id).get("policy.yaml") if self.published else None
        if merchant_id and text is not None:
            where = Path(override_label("policy.yaml", merchant_id, self.draft))
            own = _read_yaml(path) if path.is_file() else {}
            return _validate(where, _merge(_merge(base, own), _parse_yaml(text, where)))
        if not merchant_id or not path.is_file():
            return _validate(self.default_path(), base)
        return _validate(path, _merge(base, _read_yaml(path)))

    def check_all(self) -> list[str]:
        """Validate the defaults and every merchant file; return one message per problem."""
        if not self.default_path().is_file():
            return [f"{self.default_path()}: missing"]
        problems: list[str] = []
        for path in sorted(self.directory.glob("*.yaml")):
            merchant = "" if path.stem == "default" else path.stem
            try:
                self._load(merchant)
            except ConfigurationError as exc:
                problems.append(str(exc))
        return problems
