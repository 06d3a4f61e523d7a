"""The brand form (with its contrast check) and the cadence rules form: each shows the
merchant's effective values and saves what differs from its files into the draft."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jinja2
import yaml
from aiohttp import web
from pydantic import BaseModel, ValidationError

from notifier.admin import InvalidOverride
from notifier.admin_views import locales
from notifier.errors import ConfigurationError
from notifier.models import ChannelKind, ExceptionCode, Status, one_line
from notifier.policy import PolicyStore
from notifier.policy.rules import Policy
from notifier.render.brand import (
    ACCENT,
    DARK_TEXT,
    MIN_CONTRAST,
    WHITE,
    Brand,
    brand_data,
    contrast,
    load_brand,
)
from notifier.resources import data_dir
from notifier.web.base import Web
from notifier.web.forms import (
    BLANK_TEST,
    BRAND_FIELDS,
    CHANNEL_CHOICES,
    COMMITMENTS,
    EXCEPTION_LABELS,
    POLICY_FIELDS,
    RULE_FLAGS,
    STATUS_LABELS,
    TEST_MESSAGES,
    as_yaml,
    brand_from_form,
    cadence_label,
    changes,
    field_errors,
    get_path,
    policy_as_data,
    policy_from_form,
)
from notifier.web.messages import fingerprint
from notifier.web.session import Session

log = logging.getLogger(__name__)

#: What a form opened before another save says instead of saving.
CONFLICT = (
    "Not saved: someone saved these settings since you opened this page, and saving yours "
    "would undo their change. Your values are below: open the page again to see theirs, "
    "then make your change again."
)


@dataclass
class Draft:
    """What a settings form shows of the draft's file (brand.yaml, policy.yaml)."""

    #: the values the draft gives, as file data: as the draft holds them when it does not
    #: validate, so that saving the form keeps them instead of the layer beneath
    values: dict[str, Any]
    #: the values beneath the draft (the merchant's files over the defaults)
    beneath: dict[str, Any]
    #: why the draft does not validate (None: it does); ``errors`` names its fields
    broken: str | None = None
    errors: dict[str, str] = field(default_factory=dict)


def _as_broken(
    model: type[BaseModel], layered: Callable[[], dict[str, Any]], beneath: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The values of a draft that does not validate (``layered``: none when its file does
    not read) and its fields' errors. A part of another kind than the form's (a list for
    a table of rules, text for a group of fields) shows the values beneath it: the form
    cannot show it, and its error says what is wrong."""
    try:
        values = layered()
    except ConfigurationError:
        return None, {}
    try:
        model.model_validate(values)
    except ValidationError as invalid:
        return shaped(values, beneath), field_errors(invalid)
    return values, {}  # (it validates now: a file changed in between)


def _shown(
    draft: Draft, page: Callable[[dict[str, Any], dict[str, str]], web.Response]
) -> web.Response:
    """The form's page with the draft's values; with the values beneath them when the
    draft's do not fit the form (a draft that does not validate, in a way ``shaped`` does
    not foresee): the page still says why, and the merchant can fix the draft there."""
    if draft.broken is None:
        return page(draft.values, draft.errors)
    try:
        return page(draft.values, draft.errors)
    except (TypeError, AttributeError, KeyError, ValueError, jinja2.TemplateError) as exc:
        log.warning("a draft's values do not fit its form (%s): showing those beneath", exc)
        return page(draft.beneath, {})


def shaped(value: Any, like: Any) -> Any:
    """``value`` where it has the kind of ``like`` (a mapping, a list, or a plain value),
    ``like`` where it has not, mapping by mapping."""
    if isinstance(like, dict):
        if not isinstance(value, dict):
            return like
        return {**value, **{k: shaped(value[k], v) for k, v in like.items() if k in value}}
    if isinstance(like, list):
        return value if isinstance(value, list) else like
    if like is None:  # (beneath, unset: any kind may be set over it)
        return value
    return like if isinstance(value, dict | list) else value


def contrast_report(accent: str) -> dict[str, Any]:
    """The accent's contrast with white and dark button text, and which one is used; none
    for what is no colour the brand takes (``1d4ed8`` without its #, ``#12345``: they were
    reported as passing under the error saying they are no colour)."""
    try:
        if not ACCENT.match(accent):
            raise ValueError(accent)
        white, dark = contrast(accent, WHITE), contrast(accent, DARK_TEXT)
    except ValueError:
        return {"ok": False, "white": None, "dark": None}
    return {"ok": max(white, dark) >= MIN_CONTRAST, "white": white, "dark": dark}


class SettingsPages:
    """Handlers of the brand and cadence pages."""

    def __init__(self, web_: Web) -> None:
        self.web = web_

    def _templates(self) -> Any:
        return data_dir("templates", self.web.res.settings.templates_dir)

    async def _brands(self, merchant_id: str) -> Draft:
        """The brand the draft gives, and the brand data beneath the override."""
        _, files = await self.web.admin.candidate(merchant_id)
        templates = self._templates()
        try:
            beneath = load_brand(templates, merchant_id).model_dump(mode="json")
        except ConfigurationError:
            beneath = load_brand(templates, "").model_dump(mode="json")
        draft = files.get("brand.yaml")
        try:
            brand = load_brand(templates, merchant_id, draft)
        except ConfigurationError as exc:
            values, errors = _as_broken(
                Brand, lambda: brand_data(templates, merchant_id, draft)[1], beneath
            )
            if values is None:  # its YAML does not read: the brand in force
                live = (await self._live(merchant_id)).get("brand.yaml")
                try:
                    values = load_brand(templates, merchant_id, live).model_dump(mode="json")
                except ConfigurationError:
                    values = beneath
            return Draft(values, beneath, str(exc), errors)
        return Draft(brand.model_dump(mode="json"), beneath)

    async def _live(self, merchant_id: str) -> dict[str, str]:
        """The merchant's published override files (none before a first publish)."""
        live = await self.web.admin.store.live(merchant_id)
        return dict(live.files) if live else {}

    async def _base(self, merchant_id: str, path: str) -> str:
        """The fingerprint of the draft's ``path`` as a page shows it now (to notice a save
        made in between: a form saves every field it shows)."""
        _, files = await self.web.admin.candidate(merchant_id)
        return fingerprint(files.get(path) or "")

    async def brand(self, request: web.Request) -> web.Response:
        merchant_id, session = await self.web.signed_in(request)
        draft = await self._brands(merchant_id)
        base = await self._base(merchant_id, "brand.yaml")
        flash = await self.web.sessions.take_flash(request)
        page = partial(self._brand_page, request, session)
        return _shown(
            draft, lambda values, errors: page(values, errors, flash, base, None, draft.broken)
        )

    def _brand_page(
        self,
        request: web.Request,
        session: Session,
        values: dict[str, Any],
        errors: dict[str, str],
        result: Any,
        base: str,
        conflict: str | None = None,
        broken: str | None = None,
    ) -> web.Response:
        return self.web.page(
            "brand.html",
            status=409 if conflict else 422 if errors and not broken else 200,
            request=request,
            base=base,
            conflict=conflict,
            broken=broken,
            title="Brand",
            fields=[
                (n, label, help_, get_path(values, n) or "") for n, label, help_ in BRAND_FIELDS
            ],
            values=values,
            choices=CHANNEL_CHOICES,
            commitments=COMMITMENTS,
            locales=locales(self.web.res),
            errors=errors,
            labels={n: label for n, label, _ in BRAND_FIELDS},
            contrast=contrast_report(str(values.get("accent") or "")),
            min_contrast=MIN_CONTRAST,
            csrf=session.csrf,
            result=result,
        )

    async def save_brand(self, request: web.Request) -> web.StreamResponse:
        merchant_id, session = await self.web.signed_in(request)
        form = await self.web.form(request, session)
        draft = await self._brands(merchant_id)
        wanted = brand_from_form(form, draft.values)
        for one in ("name", "logo_alt"):  # saved as the brand reads it: one line
            if isinstance(wanted.get(one), str):
                wanted[one] = one_line(wanted[one])
        page = self._brand_page
        return await self._save(
            request, session, form, "brand.yaml", Brand, draft.beneath, wanted, page
        )

    # -- cadence rules --------------------------------------------------------------------
    async def _policies(self, merchant_id: str) -> Draft:
        """The policy the draft gives, and the policy beneath the override, as file data."""
        _, files = await self.web.admin.candidate(merchant_id)
        directory = data_dir("policies", self.web.res.settings.policies_dir)
        beneath_store = PolicyStore(directory)
        try:
            beneath = policy_as_data(beneath_store.strict(merchant_id))
        except ConfigurationError:
            beneath = policy_as_data(beneath_store.strict(""))
        store = PolicyStore(directory, lambda _: files, draft=True)
        try:
            effective = store.strict(merchant_id)
        except ConfigurationError as exc:
            values, errors = _as_broken(
                Policy, lambda: store.layered(merchant_id, beneath), beneath
            )
            if values is None:  # its YAML does not read: the policy in force
                live = await self._live(merchant_id)
                try:
                    in_force = PolicyStore(directory, lambda _: live).strict(merchant_id)
                    values = policy_as_data(in_force)
                except ConfigurationError:
                    values = beneath
            return Draft(values, beneath, str(exc), errors)
        return Draft(policy_as_data(effective), beneath)

    async def cadence(self, request: web.Request) -> web.Response:
        merchant_id, session = await self.web.signed_in(request)
        draft = await self._policies(merchant_id)
        result = await self.web.sessions.take_flash(request)
        base = await self._base(merchant_id, "policy.yaml")
        page = partial(self._cadence_page, request, session)
        return _shown(
            draft, lambda values, errors: page(values, errors, result, base, None, draft.broken)
        )

    def _cadence_page(
        self,
        request: web.Request,
        session: Session,
        values: dict[str, Any],
        errors: dict[str, str],
        result: Any,
        base: str,
        conflict: str | None = None,
        broken: str | None = None,
    ) -> web.Response:
        general = values["statuses"].get(Status.EXCEPTION.value, {"channels": []})
        rows = [
            (f"statuses.{s.value}", STATUS_LABELS[s], values["statuses"].get(s.value, {}), None)
            for s in Status
        ] + [
            (
                f"exceptions.{c.value}",
                "Problem: " + EXCEPTION_LABELS[c],
                values["exceptions"].get(c.value, general),
                c.value not in values["exceptions"],  # inherits "Any problem"
            )
            for c in ExceptionCode
        ]
        return self.web.page(
            "cadence.html",
            status=409 if conflict else 422 if errors and not broken else 200,
            request=request,
            base=base,
            conflict=conflict,
            broken=broken,
            title="Cadence rules",
            rows=rows,
            flags=RULE_FLAGS,
            channels=[c.value for c in ChannelKind],
            fields=[
                (name, label, unit, text, _field_value(get_path(values, name)))
                for name, label, unit, text in POLICY_FIELDS
            ],
            values=values,
            errors=errors,
            csrf=session.csrf,
            result=result,
            # each test, and a blank row to start one
            tests=list(enumerate([*values.get("experiments", []), BLANK_TEST])),
            label=cadence_label,
            test_messages=TEST_MESSAGES,
        )

    async def save_cadence(self, request: web.Request) -> web.StreamResponse:
        merchant_id, session = await self.web.signed_in(request)
        form = await self.web.form(request, session)
        draft = await self._policies(merchant_id)
        wanted = policy_from_form(form, draft.values, draft.beneath)
        page = self._cadence_page
        return await self._save(
            request, session, form, "policy.yaml", Policy, draft.beneath, wanted, page
        )

    async def _save(
        self,
        request: web.Request,
        session: Session,
        form: dict[str, str],
        path: str,
        model: type[BaseModel],
        beneath: dict[str, Any],
        wanted: dict[str, Any],
        page: Callable[..., web.Response],
    ) -> web.StreamResponse:
        """Save what of ``wanted`` differs from ``beneath`` as the draft's ``path``, once it
        validates as ``model``; otherwise show the form again with each field's error. A
        form opened before someone else saved ``path`` is refused (409): it holds every
        field, so saving it would undo their change."""
        merchant_id = request.match_info["merchant_id"]
        base = form.get("base", "")
        if base != await self._base(merchant_id, path):
            return page(request, session, wanted, {}, None, base, CONFLICT)
        try:
            model.model_validate(wanted)
        except ValidationError as exc:
            return page(request, session, wanted, field_errors(exc), None, base)
        header = f"{path} written by the merchant editor: what differs from the files beneath"
        differs = changes(beneath, wanted)
        text = as_yaml(differs, header)
        _, files = await self.web.admin.candidate(merchant_id)
        current = files.get(path)
        if text == current or _says(current, differs):
            # untouched: no revision, and no file that only says nothing differs
            await self.web.sessions.flash(request, {"unchanged": True})
            raise web.HTTPSeeOther(request.path)
        try:
            result = await self.web.admin.save_file(merchant_id, path, text, session.key_id)
        except InvalidOverride as exc:  # over the size limit: the form again, as typed
            refused = page(request, session, wanted, {}, None, base, f"Not saved: {exc.message}")
            refused.set_status(422)
            return refused
        await self.web.sessions.flash(request, result)
        raise web.HTTPSeeOther(request.path)


def _says(current: str | None, differs: dict[str, Any]) -> bool:
    """Whether the draft's file ``current`` already says ``differs`` (its comments, key
    order and quoting aside), or, absent, that nothing differs."""
    if current is None:
        return not differs
    try:
        return (yaml.safe_load(current) or {}) == differs
    except yaml.YAMLError:
        return False


def _field_value(value: Any) -> Any:
    """A setting's value in its field: ``168`` for the ``168.0`` a policy file's number
    reads as (the form sends it back the same)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
