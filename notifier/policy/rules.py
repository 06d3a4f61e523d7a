"""Policy files: policies/default.yaml merged with policies/<merchant_id>.yaml, schema-validated."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from notifier.errors import ConfigurationError
from notifier.models import ChannelKind, ExceptionCode, Status


class Policy(BaseModel):
    """The cadence rules for one merchant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: status -> channels that carry it; a status left out is not notified.
    notify: dict[Status, list[ChannelKind]] = Field(default_factory=dict)
    #: exception_code -> channels, overriding ``notify["exception"]`` for that code.
    exceptions: dict[ExceptionCode, list[ChannelKind]] = Field(default_factory=dict)
    #: the same milestone is not re-notified on a channel within this many hours.
    dedupe_window_hours: float = Field(default=168, ge=0)

    def channels_for(self, status: Status, code: ExceptionCode | None) -> list[ChannelKind]:
        """The channels a transition with this status (and exception code) goes out on."""
        if code is not None and code in self.exceptions:
            return self.exceptions[code]
        return self.notify.get(status, [])


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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read: {exc.strerror}") from exc
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
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"{path}: {problems}") from exc


class PolicyStore:
    """Layered policy lookup (merchant file over defaults) with a cache that can be invalidated."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[str, Policy] = {}
        self._lock = threading.Lock()

    def default_path(self) -> Path:
        return self.directory / "default.yaml"

    def for_merchant(self, merchant_id: str) -> Policy:
        """The merged policy for ``merchant_id`` (cached)."""
        policy = self._cache.get(merchant_id)
        if policy is None:
            policy = self._load(merchant_id)
            with self._lock:
                self._cache[merchant_id] = policy
        return policy

    def invalidate(self, merchant_id: str | None = None) -> None:
        """Forget cached policies (one merchant, or all) so edits are picked up."""
        with self._lock:
            if merchant_id is None:
                self._cache.clear()
            else:
                self._cache.pop(merchant_id, None)

    def _load(self, merchant_id: str) -> Policy:
        base = _read_yaml(self.default_path())
        path = self.directory / f"{merchant_id}.yaml"
        if not path.is_file():
            return _validate(self.default_path(), base)
        return _validate(path, _merge(base, _read_yaml(path)))

    def check_all(self) -> list[str]:
        """Validate the defaults and every merchant file; return one message per problem."""
        problems: list[str] = []
        if not self.default_path().is_file():
            return [f"{self.default_path()}: missing"]
        for path in sorted(self.directory.glob("*.yaml")):
            merchant = path.stem
            try:
                self._load("" if merchant == "default" else merchant)
            except ConfigurationError as exc:
                problems.append(str(exc))
        return problems
