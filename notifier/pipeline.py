"""The worker's batch step: inbox entries → shipment state + decisions (atomic) → deliveries.

One call handles hundreds of transitions with a handful of Redis round trips:
one pipelined read of every shipment touched, one script call that commits
them all (compare-and-set on each shipment's version), one claim call, one
pipelined write of the receipts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson
from pydantic import ValidationError
from redis.exceptions import RedisError

from notifier import metrics
from notifier.addresses import canonical_phone, email_problem, phone_problem
from notifier.delivery import Deliverer, DeliveryReport
from notifier.insights import counts, journeys
from notifier.insights.predict import Model, Prediction, predict
from notifier.models import (
    STATUS_RANK,
    ChannelKind,
    Decision,
    DeliveryWindow,
    ExceptionCode,
    Notification,
    Outcome,
    Status,
    Transition,
    assembled,
    message_name,
    notification_id,
    notification_id_of,
    own_event_id,
    replaced,
    waiting_payload,
)
from notifier.outbound import events as hook_events
from notifier.policy import Policy, Step, fold, is_old, opt_out_key
from notifier.resources import Resources, sync_published
from notifier.state import OVERTAKE_MARGIN, TERMINAL, ShipmentState
from notifier.store import (
    Admission,
    InboxEntry,
    LedgerState,
    Scope,
    ShipmentCommit,
    Store,
    StoredInPart,
    body_digest,
    wake,
)

log = logging.getLogger(__name__)

#: Rounds of re-deciding shipments another worker changed under us before giving up
#: (the entries then stay unacknowledged and are retried).
MAX_ROUNDS = 100

ShipmentKey = tuple[str, str]


@dataclass
class BatchReport:
    """What one batch did, for logs and tests."""

    transitions: int = 0
    decisions: int = 0
    notifications: list[str] = field(default_factory=list)
    already_processed: int = 0
    #: entries that are no valid transition (an earlier version's, or not the API's): the
    #: worker sets them aside on the inbox dead-letter stream
    invalid: list[InboxEntry] = field(default_factory=list)
    delivery: DeliveryReport = field(default_factory=DeliveryReport)
    #: inbox entries with a notification another worker is still sending: do not ack yet
    unsettled: set[str] = field(default_factory=set)
    #: when each of those is worth trying again (epoch ms): its own messages' latest time
    unsettled_until: dict[str, int] = field(default_factory=dict)


@dataclass
class _Fold:
    commit: ShipmentCommit
    decisions: int
    notifications: list[str]
    recover: list[str]
    #: notification id -> inbox entry it came from
    owner: dict[str, str]
    #: the notifications created, by id (so delivery need not parse them back)
    built: dict[str, Notification]
    #: (outcome, rule, channel) of each decision, and the inbox entries decided (metrics)
    labels: list[tuple[str, str, str]] = field(default_factory=list)
    decided: list[str] = field(default_factory=list)
    #: (notification id, channel, why) of messages of earlier batches, still waiting for
    #: their due time, that this fold superseded: cancelled once it is committed
    overtaken: list[tuple[str, ChannelKind, str]] = field(default_factory=list)


#: the outcomes whose message goes out (now, or once its wait is over)
_GOING = (Outcome.SENT, Outcome.DEFERRED)


def _canonical(t: Transition) -> Transition:
    """``t`` with its recipient's number in its one E.164 spelling (``+330612345678`` ->
    ``+33612345678``): what opt-outs and STOPs are kept under, so what is sent to."""
    r = t.recipient
    if r is None or not r.phone or (phone := canonical_phone(r.phone)) == r.phone:
        return t
    return t.model_copy(update={"recipient": r.model_copy(update={"phone": phone})})


def _scope(store: Store, shipments: Iterable[ShipmentKey]) -> Scope:
    """The scope of a batch: one partition's (a drain's), so on a Redis Cluster its keys
    share one slot."""
    scopes = {store.scope_of(m, s) for m, s in shipments}
    if len(scopes) > 1:
        raise ValueError("a batch holds shipments of several partitions")
    return scopes.pop() if scopes else None


def _stall_at_ms(policy: Policy, state: ShipmentState, now: datetime) -> int | None:
    rules = policy.stalled
    if not rules.enabled:
        return None
    if state.last_scan_at is not None and now - state.last_scan_at > policy.stale_after:
        return None  # old shipments imported, a backlog replayed long after: not live
    deadline = state.stall_deadline(
        frozenset(rules.statuses),
        timedelta(hours=rules.no_scan_hours),
        timedelta(hours=rules.after_window_hours),
    )
    return None if deadline is None else int(deadline.timestamp() * 1000)


class Pipeline:
    """Processes batches of inbox entries; safe to run in any number of workers at once."""

    def __init__(self, res: Resources) -> None:
        self.res = res
        self.deliverer = Deliverer(res)
        self.hooks = res.hooks
        #: the delivery-time models of the round's merchants (``insights.predict``)
        self._models: dict[str, Model] = {}

    async def process(self, entries: Sequence[InboxEntry]) -> BatchReport:
        """Decide and deliver everything in ``entries``; raises if Redis fails (entries stay)."""
        report = BatchReport()
        groups: dict[ShipmentKey, list[tuple[str, Transition]]] = {}
        #: (merchant, event id) -> the API request that accepted it
        request_ids: dict[tuple[str, str], str] = {}
        for entry in entries:
            try:
                t = _canonical(Transition.model_validate_json(entry.payload))
            except ValidationError:
                # Only the API writes the inbox, after validating; log the id, not the data.
                log.error(
                    "inbox entry %s (request %s) is not a valid transition; set aside",
                    entry.entry_id,
                    entry.request_id or "unknown",
                )
                report.invalid.append(entry)
                continue
            groups.setdefault((t.merchant_id, t.shipment_id), []).append((entry.entry_id, t))
            if entry.request_id:
                request_ids[(t.merchant_id, t.event_id)] = entry.request_id
            report.transitions += 1

        scope = _scope(self.res.store, groups)
        # a merchant's published override (the editor's) may have moved since the last batch
        await sync_published(self.res, {m for m, _ in groups})
        to_deliver: list[str] = []
        owner: dict[str, str] = {}
        built: dict[str, Notification] = {}
        #: per new notification, when its transition was accepted and when it was decided
        timing: dict[str, tuple[float, float]] = {}
        states: dict[ShipmentKey, ShipmentState] = {}
        pending = groups
        #: shipments whose histories are worth compacting once this batch is delivered
        long: list[ShipmentKey] = []
        retention = min(self.res.settings.retention_after_final_s, self.res.settings.state_ttl_s)
        for round_no in range(MAX_ROUNDS):
            if not pending:
                break
            if round_no:
                # Lost a race on some shipments: back off a little so contenders spread out.
                await asyncio.sleep(random.uniform(0, 0.001 * min(round_no, 20)))
            keys = list(pending)
            loaded = await self.res.store.load_states(keys, settled_by=self.res.clock())
            await self.hooks.refresh(m for m, _ in keys)
            opted = await self._opt_outs(pending, loaded)
            now = self.res.clock()
            # Looked up once per merchant and round: an edited policy applies from the next batch.
            policies = {m: self.res.policies.for_merchant(m) for m in {m for m, _ in keys}}
            # each merchant's delivery-time model (read at most every 10 minutes)
            self._models = await self.res.predictions.models(list(policies), now.date())
            folds = [
                self._fold(
                    key,
                    version,
                    state,
                    pending[key],
                    now,
                    opted.get(key[0], {}),
                    policies,
                    request_ids,
                    retention,
                )
                for key, (version, state) in zip(keys, loaded, strict=True)
            ]
            done = await self.res.store.commit_batch([f.commit for f in folds], now.isoformat())
            conflicts = set(done.conflicts)
            long += [keys[i] for i in done.long]
            committed_at = time.time()
            committed = [(keys[i], f.commit) for i, f in enumerate(folds) if i not in conflicts]
            await self._remember(committed, retention, scope)
            await self._cancel_overtaken(
                [(keys[i], f) for i, f in enumerate(folds) if i not in conflicts], now, scope
            )
            for i, f in enumerate(folds):
                if i in conflicts:
                    continue
                metrics.decisions(f.labels)
                metrics.decided(f.decided)
                for nid in f.notifications:
                    timing[nid] = (metrics.entry_time(f.owner[nid]), committed_at)
                report.decisions += f.decisions
                report.notifications += f.notifications
                to_deliver += f.notifications + f.recover
                owner.update(f.owner)
                built.update(f.built)
                states[keys[i]] = f.commit.state
            pending = {keys[i]: pending[keys[i]] for i in conflicts}
        else:
            if pending:
                raise RuntimeError(f"{len(pending)} shipments kept conflicting; will retry")
        report.already_processed = len(to_deliver) - len(report.notifications)
        if to_deliver:
            report.delivery = await self.deliverer.deliver(
                to_deliver, states=states, built=built, timing=timing, scope=scope
            )
            report.unsettled_until = _unsettled(report.delivery, owner)
            report.unsettled = set(report.unsettled_until)
        await self._compact(long)
        await self._predicted_late(states, self.res.clock())
        return report

    async def _predicted_late(
        self, states: Mapping[ShipmentKey, ShipmentState], now: datetime
    ) -> None:
        """One ``exception/delayed`` for each shipment predicted to arrive after its
        estimated window, while the window is open, where the merchant's policy asks for it
        (``stalled.predicted_late``); an event id fixed by the window, so once per window."""
        late = []
        for (merchant_id, _), state in states.items():
            window = state.estimated_delivery
            if window is None or window.end <= now or state.status in TERMINAL:
                continue
            if state.status is Status.EXCEPTION or not state.carrier or not state.tracking_number:
                continue  # a problem already told, or not enough to say one
            if not self.res.policies.for_merchant(merchant_id).stalled.predicted_late:
                continue
            model = self._models.get(merchant_id) or await self.res.predictions.model(
                merchant_id, now.date()
            )
            found = predict(model, state, now)
            if found is not None and found.likely_late:
                late.append(_late_transition(state, found))
        if late:
            try:
                await inject(self.res, late, "prediction")
            except (RedisError, OSError) as exc:  # the next scan tries again
                log.warning("%d predicted-late transitions not queued (%s)", len(late), exc)

    async def _compact(self, shipments: list[ShipmentKey]) -> None:
        """Fold long histories into chunks (``Shipments.compact``): it only saves memory, so
        a failure here is logged, and the batch (decided and delivered) stands."""
        if not shipments:
            return
        try:
            await self.res.store.compact(shipments)
        except RedisError as e:
            log.warning("compacting %d histories failed (%s); left for later", len(shipments), e)
        except Exception as e:  # a list that does not read: the lists stay as they are
            log.error(
                "compacting %d histories failed (%s: %s); left as they are",
                len(shipments),
                type(e).__name__,
                e,
            )

    async def _cancel_overtaken(
        self, committed: list[tuple[ShipmentKey, _Fold]], now: datetime, scope: Scope
    ) -> None:
        """Cancel the waiting messages the committed folds overtook (README rule 9), each
        only while it still waits (the due sweep checks again before it sends one)."""
        overtaken, channel = [], {}
        for key, f in committed:
            for nid, c, why in f.overtaken:
                overtaken.append((nid, key, why))
                channel[nid] = c
        if not overtaken:
            return
        after_ms = int((now + OVERTAKE_MARGIN).timestamp() * 1000)
        for nid in await self.res.store.cancel_overtaken(overtaken, after_ms, scope):
            metrics.deliveries(channel[nid].value, "cancelled")

    async def _remember(
        self, committed: list[tuple[ShipmentKey, ShipmentCommit]], retention: int, scope: Scope
    ) -> None:
        """After a commit (which indexed the tracking numbers with the states): let an ended
        shipment's earlier messages follow its retention."""
        ended, finished = [], []
        for (merchant_id, shipment_id), commit in committed:
            if commit.ttl_s is not None:
                finished.append((merchant_id, shipment_id))
                ended += [
                    notification_id_of(merchant_id, shipment_id, m.event_id, m.channel)
                    for m in commit.state.messages
                ]
        if finished:
            await self.res.store.shorten(ended, retention, scope, finished)

    async def _opt_outs(
        self,
        groups: dict[ShipmentKey, list[tuple[str, Transition]]],
        loaded: list[tuple[int, ShipmentState | None]],
    ) -> dict[str, dict[str, str]]:
        """Per merchant, the addresses its shipments may be messaged at that must not be:
        opted out, or unusable (no such number, a landline, a malformed email address),
        each with the reason the history gives."""
        by_merchant: dict[str, set[str]] = {}
        blocked: dict[str, dict[str, str]] = {}
        for ((merchant_id, _), items), (_, state) in zip(groups.items(), loaded, strict=True):
            candidates = [state.recipient] if state and state.recipient else []
            candidates += [t.recipient for _, t in items if t.recipient]
            keys = by_merchant.setdefault(merchant_id, set())
            reasons = blocked.setdefault(merchant_id, {})
            for r in candidates:
                for channel, address, problem in (
                    (ChannelKind.EMAIL, r.email, email_problem),
                    (ChannelKind.SMS, r.phone, phone_problem),
                ):
                    if not address:
                        continue
                    key = opt_out_key(channel, address)
                    keys.add(key)
                    why = problem(address)
                    if why is not None:
                        reasons[key] = f"unusable {channel} address: {why}"
        for merchant_id, keys in by_merchant.items():
            for key in await self.res.store.opted_out(merchant_id, sorted(keys)):
                blocked[merchant_id][key] = f"recipient opted out of {key.split(':', 1)[0]}"
        return blocked

    def _fold(
        self,
        key: ShipmentKey,
        version: int,
        state: ShipmentState | None,
        transitions: list[tuple[str, Transition]],
        now: datetime,
        opted_out: dict[str, str],
        policies: dict[str, Policy],
        request_ids: Mapping[tuple[str, str], str] | None = None,
        final_ttl_s: int | None = None,
    ) -> _Fold:
        """Fold a shipment's transitions (in arrival order) through the policy. Pure."""
        merchant_id, shipment_id = key
        policy = policies[merchant_id]
        start = state or ShipmentState(merchant_id=merchant_id, shipment_id=shipment_id)
        entry_of = {t.event_id: entry_id for entry_id, t in transitions}
        final, steps = fold(policy, start, [t for _, t in transitions], now, opted_out)
        final, carried = _journey(final, start, steps)
        history: list[bytes] = []
        created: list[tuple[str, str, str, bytes]] = []
        recover: list[str] = []
        owner: dict[str, str] = {}
        built: dict[str, Notification] = {}
        decisions = 0
        model = self._models.get(merchant_id)
        known: list[DeliveryWindow | None] = []

        def predicted() -> DeliveryWindow | None:
            """The shipment's predicted delivery for its messages (once per fold)."""
            if not known:
                found = predict(model, final, now) if model is not None else None
                known.append(
                    None
                    if found is None
                    else assembled(
                        DeliveryWindow, {"start": found.delivery_by, "end": found.latest}
                    )
                )
            return known[0]

        labels: list[tuple[str, str, str]] = []
        decided: list[str] = []
        for step in steps:
            t = step.transition
            entry_id = entry_of[step.caught_up_by or t.event_id]
            rid = (request_ids or {}).get((merchant_id, step.caught_up_by or t.event_id))
            if step.replay:
                # A redelivered entry (a worker died after committing): finish its sends,
                # and, for a late event, those of the current milestone it may have caught up
                late = final.is_step_back(t, is_old(policy, t, now))
                current = final.current_transition() if late else None
                for about in (t, current) if current is not None else (t,):
                    for c in ChannelKind:
                        rid = notification_id(about, c)
                        if rid not in owner:  # once, however many entries name it
                            recover.append(rid)
                            owner[rid] = entry_id
                continue
            if step.caught_up_by is None:
                decided.append(entry_id)
            going = {v.channel for v in step.verdicts if v.outcome in _GOING}
            # (in any arrival order: a pickup notice, or a door scan, arriving after its
            # delivered in one batch counts as its final state says)
            collected = t.status is Status.DELIVERED and (
                final.collected if final.status is Status.DELIVERED else step.collected
            )
            about = _with_facts(t, final)  # (once: an event's email and SMS share it)
            for verdict in step.verdicts:
                nid = None
                if verdict.outcome in _GOING:
                    assert verdict.channel is not None and verdict.to is not None
                    assert final.recipient is not None
                    nid = notification_id(t, verdict.channel)
                    owner[nid] = entry_id
                    test = policy.experiment_of.get(message_name(t)) if policy.experiments else None
                    n = assembled(  # of validated parts: not validated again
                        Notification,
                        {
                            "notification_id": nid,
                            "merchant_id": merchant_id,
                            "shipment_id": shipment_id,
                            "channel": verdict.channel,
                            "to": verdict.to,
                            "transition": about,
                            "recipient": final.recipient,
                            "created_at": now,
                            "predicted": predicted(),
                            "experiment": test.name if test is not None else None,
                            "variant": test.variant(merchant_id, shipment_id) if test else None,
                            "alone": True
                            if verdict.channel is ChannelKind.SMS and ChannelKind.EMAIL not in going
                            else None,
                            "collected": True if collected else None,
                            "reached": step.rank if step.rank > STATUS_RANK[t.status] else None,
                        },
                    )
                    built[nid] = n
                    deferred = verdict.outcome is Outcome.DEFERRED and verdict.send_at
                    created.append(
                        (
                            nid,
                            LedgerState.DEFERRED if deferred else LedgerState.PENDING,
                            str(int(verdict.send_at.timestamp() * 1000))
                            if deferred and verdict.send_at
                            else "",
                            # one that waits for hours is packed, without what its key
                            # says (a fifth of its size); one sent now leaves the ledger in
                            # milliseconds, as it is
                            waiting_payload(n, created_in_ledger=True)
                            if deferred
                            else n.model_dump_json(exclude_none=True).encode(),
                        )
                    )
                decision = Decision.about(
                    t,
                    channel=verdict.channel,
                    outcome=verdict.outcome,
                    reason=_explained(t, verdict.reason),
                    notification_id=nid,
                    decided_at=now,
                    send_at=verdict.send_at,
                    details=dict(verdict.details),
                    request_id=rid,
                )
                history.append(decision.history_entry())
                labels.append((verdict.outcome.value, verdict.rule, verdict.channel or "all"))
                decisions += 1
        commit = ShipmentCommit(
            merchant_id,
            shipment_id,
            version,
            final,
            history,
            created,
            stall_at_ms=_stall_at_ms(policy, final, now),
            # a shipment that reached its end is kept only as long as retention says
            ttl_s=final_ttl_s if final.status in TERMINAL else None,
            events=self._hook_events(merchant_id, steps, final, now),
            counts=tuple(
                counts.of_steps(steps, final.recipient.locale if final.recipient else None).items()
            ),
            carrier_counts=tuple(carried.items()),
            day=counts.day_of(now),
        )
        notifications = [nid for nid, *_ in created]
        overtaken = [
            (notification_id_of(merchant_id, shipment_id, m.event_id, m.channel), m.channel, why)
            for m, why in final.overtaken(start.messages, now)
        ]
        return _Fold(
            commit, decisions, notifications, recover, owner, built, labels, decided, overtaken
        )

    def _hook_events(
        self, merchant_id: str, steps: Sequence[Step], final: ShipmentState, now: datetime
    ) -> tuple[tuple[str, bytes], ...]:
        """The merchant webhook events of a fold that some endpoint of the merchant takes
        (queued by the commit, with the decisions)."""
        out = []
        for step in steps:
            kind = hook_events.type_of(step.transition)
            if kind is None or not self.hooks.wanted(merchant_id, kind):
                continue
            order = final.order.number if final.order else None
            event = hook_events.from_step(
                step, merchant_id, now, self.res.settings.public_url, order
            )
            if event is not None:
                out.append((event["id"], hook_events.stored(event)))
        return tuple(out)


def _with_facts(t: Transition, state: ShipmentState) -> Transition:
    """``t`` with the tracking link and the order number its shipment's earlier events
    gave, where it has none (README rule 1: the backend may send them once); the link
    only when it tracks ``t``'s label (another carrier's number keeps no old link)."""
    url = t.tracking_url or state.link_for(t.tracking_number)
    order = t.order or state.order
    if url is t.tracking_url and order is t.order:
        return t
    return replaced(t, {"tracking_url": url, "order": order})


def _journey(
    final: ShipmentState, start: ShipmentState, steps: Sequence[Step]
) -> tuple[ShipmentState, dict[str, int]]:
    """The final state with its journey advanced by the fold's scans (not redeliveries, not
    late scans it had moved past), and the carrier counts that made (``insights.journeys``)."""
    # a shipment older than journeys (it has events already) starts a partial one
    journey = start.journey or journeys.Journey(partial=start.events > 0)
    before = journey
    carried: dict[str, int] = {}
    for step in steps:
        if step.replay or step.caught_up_by is not None or journeys.late(step.verdicts):
            continue
        if step.transition.event_id.startswith(journeys.OWN_EVENTS):
            continue
        journey, made = journeys.advance(journey, step.transition)
        for name, n in made.items():
            carried[name] = carried.get(name, 0) + n
    if journey is before:
        return final, carried
    return replaced(final, {"journey": journey}), carried


#: the event id prefix of a predicted-late transition (``Pipeline._predicted_late``)
PREDICTED_LATE = hook_events.PREDICTED_PREFIX


def _explained(t: Transition, reason: str) -> str:
    """A decision's reason; for a transition the service made itself (a stall notice, a
    predicted delay), what it saw first: no carrier said it, so the merchant reading the
    history learns why the customer was told of a delay."""
    if t.carrier_description and t.event_id.startswith(journeys.OWN_EVENTS):
        return f"{t.carrier_description}; {reason}"
    return reason


def _late_transition(state: ShipmentState, found: Prediction) -> Transition:
    window = state.estimated_delivery
    assert window is not None and state.carrier and state.tracking_number
    scanned = state.last_scan_at or found.delivery_by
    return Transition(
        event_id=own_event_id(
            PREDICTED_LATE, int(window.end.timestamp() * 1000), state.shipment_id
        ),
        merchant_id=state.merchant_id,
        shipment_id=state.shipment_id,
        tracking_number=state.tracking_number,
        carrier=state.carrier,
        status=Status.EXCEPTION,
        exception_code=ExceptionCode.DELAYED,
        # just after the last real scan (as the stall check): a later scan is still news
        occurred_at=scanned + timedelta(milliseconds=1),
        estimated_delivery=window,
        tracking_url=state.tracking_url,
        order=state.order,
        carrier_description=(
            f"delivery prediction: about {found.delivery_by:%Y-%m-%d %H:%M} UTC, after the "
            f"estimated delivery window ends ({window.end.astimezone(UTC):%Y-%m-%d %H:%M} UTC; "
            "stalled.predicted_late)"
        ),
    )


def _unsettled(delivery: DeliveryReport, owner: Mapping[str, str]) -> dict[str, int]:
    """The inbox entries of the notifications a delivery left busy, each with when it is
    worth trying again: the latest of its own notifications' times (epoch ms)."""
    until: dict[str, int] = {}
    for nid in delivery.busy:
        entry = owner[nid]
        until[entry] = max(until.get(entry, 0), delivery.busy_until[nid])
    return until


async def inject(res: Resources, transitions: Sequence[Transition], source: str) -> int:
    """Put transitions the service makes itself (a stall, a predicted delay) through ingest,
    as the tracking backend's are: idempotent by event id, woken like them. How many were new."""
    items = []
    for t in transitions:
        body = t.model_dump_json().encode()
        digest = body_digest(orjson.loads(body))
        items.append((t.merchant_id, t.shipment_id, t.event_id, body, digest, source))
    if not items:
        return 0
    try:
        admitted, woken = await res.store.ingest(items)
    except StoredInPart as exc:
        # stored where its call went through: those drains need not wait for the sweep
        await wake(res.queue, exc.take_woken())
        raise
    await wake(res.queue, woken)
    return sum(1 for a in admitted if a is Admission.ACCEPTED)
