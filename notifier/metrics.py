"""Prometheus metrics, served at ``GET /metrics``.

Counters and histograms are kept by the process that does the work (the API counts
transitions and requests, workers count decisions and deliveries). With
``NOTIFIER_METRICS_DIR`` set, every process on the host writes its values to files in that
folder (prometheus-client's multiprocess mode) and ``/metrics`` adds them up, so one scrape
of the API sees the workers too. Gauges of what Redis holds (inbox depth and age per
partition, the due index, dead letters, live workers) are read from Redis at scrape time,
so they are right whichever process is scraped.

Labels carry only names from fixed vocabularies (outcomes, rules, channels, routes): never a
merchant id, an address, a shipment or any text a merchant or carrier wrote.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from notifier.errors import ConfigurationError
from notifier.store import Store, keys

__all__ = ["CONTENT_TYPE_LATEST", "configure", "exposition"]

#: Seconds: from a few milliseconds (a warm worker) to an hour (a backlog after an outage).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

M = TypeVar("M", Counter, Histogram)


class _Metrics:
    """The process's counters and histograms, in ``registry`` (or the multiprocess files)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        #: each metric's labelled children, found once (``labels()`` checks and locks on
        #: every call; a worker calls it several times per message). As many as the metrics
        #: hold: their labels come from fixed vocabularies.
        self.children: dict[tuple[object, tuple[str, ...]], object] = {}
        self.transitions = Counter(
            "notifier_transitions",
            "Transitions posted to the API, by result (accepted, duplicate, conflict, rejected; "
            "unconfirmed: stored, but too few replicas confirmed in time).",
            ["result"],
            registry=registry,
        )
        self.requests = Counter(
            "notifier_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "notifier_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.decisions = Counter(
            "notifier_decisions",
            "Decisions recorded, by outcome, the rule that decided and channel.",
            ["outcome", "rule", "channel"],
            registry=registry,
        )
        self.deliveries = Counter(
            "notifier_deliveries",
            "Delivery attempts' results by channel (sent, failed, retrying, cancelled).",
            ["channel", "result"],
            registry=registry,
        )
        self.hook_attempts = Counter(
            "notifier_merchant_hook_attempts",
            "Merchant webhook delivery attempts by outcome (delivered, failed, gave_up).",
            ["outcome"],
            registry=registry,
        )
        self.ingest_to_decision = Histogram(
            "notifier_ingest_to_decision_seconds",
            "From the API accepting a transition to its decision being committed.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.decision_to_provider = Histogram(
            "notifier_decision_to_provider_seconds",
            "From a decision to send to the provider accepting the message (not deferred ones).",
            ["channel"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.end_to_end = Histogram(
            "notifier_end_to_end_seconds",
            "From the API accepting a transition to the provider accepting its message "
            "(messages sent at once, not deferred ones).",
            ["channel"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def child(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, looked up once."""
        key = (metric, labels)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = metric.labels(*labels)
        return found  # type: ignore[return-value]


_state: dict[str, object] = {"dir": None}
_metrics = _Metrics(CollectorRegistry())


def process_id() -> str:
    """Names this process's files in the metrics folder: unique across the containers that
    share it, where every process may be PID 1 (no "_": the collector splits names on it)."""
    return f"{socket.gethostname().replace('_', '-')}-{os.getpid()}"


def configure(directory: Path | None) -> None:
    """Use ``directory`` for multiprocess metrics (None: this process's own registry).

    Call before the process counts anything: values already counted stay where they were.
    """
    global _metrics
    if _state["dir"] == directory:
        return
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"NOTIFIER_METRICS_DIR: cannot make {directory}: {exc.strerror or exc}"
            ) from exc
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        values.ValueClass = values.MultiProcessValue(process_identifier=process_id)  # type: ignore[no-untyped-call]
    else:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _state["dir"] = directory
    _metrics = _Metrics(CollectorRegistry())


def transitions(counts: dict[str, int]) -> None:
    for result, n in counts.items():
        if n:
            _metrics.child(_metrics.transitions, result).inc(n)


def request(route: str, method: str, status: int, seconds: float) -> None:
    _metrics.child(_metrics.requests, route, method, str(status)).inc()
    _metrics.child(_metrics.request_seconds, route).observe(seconds)


def decisions(labels: Iterable[tuple[str, str, str]]) -> None:
    for (outcome, rule, channel), n in Tally(labels).items():
        _metrics.child(_metrics.decisions, outcome, rule, channel).inc(n)


def deliveries(channel: str, result: str, n: int = 1) -> None:
    if n:
        _metrics.child(_metrics.deliveries, channel, result).inc(n)


def hook_attempts(outcome: str) -> None:
    _metrics.child(_metrics.hook_attempts, outcome).inc()


def entry_time(entry_id: str) -> float:
    """When the API wrote an inbox entry (Unix seconds): its stream id holds the time, in ms."""
    return int(entry_id.partition("-")[0] or 0) / 1000


def entry_age_s(entry_id: str, now: float | None = None) -> float:
    """Seconds since the API wrote an inbox entry."""
    return max(0.0, (time.time() if now is None else now) - entry_time(entry_id))


def decided(entry_ids: Iterable[str]) -> None:
    """Decisions committed for the transitions of these inbox entries."""
    now = time.time()
    for entry_id in entry_ids:
        _metrics.ingest_to_decision.observe(entry_age_s(entry_id, now))


def provider_accepted(channel: str, decided_at: float, accepted_at: float) -> None:
    """A provider took a message decided at ``decided_at``, whose transition the API
    accepted at ``accepted_at`` (Unix seconds)."""
    now = time.time()
    _metrics.child(_metrics.decision_to_provider, channel).observe(max(0.0, now - decided_at))
    _metrics.child(_metrics.end_to_end, channel).observe(max(0.0, now - accepted_at))


class _Snapshot(Collector):
    """Metric families computed before the scrape (from Redis, asynchronously)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def redis_gauges(store: Store, workers_key: str, alive_s: float) -> list[Metric]:
    """What Redis holds now; ``notifier_redis_up`` 0 (and nothing else) when it does not answer."""
    up = GaugeMetricFamily("notifier_redis_up", "1 when Redis answered this scrape.")
    try:
        families = await _read_redis(store, workers_key, alive_s)
    except (RedisError, OSError):
        up.add_metric([], 0)
        return [up]
    up.add_metric([], 1)
    return [up, *families]


async def _read_redis(store: Store, workers_key: str, alive_s: float) -> list[Metric]:
    # A handled entry is acknowledged and deleted from its stream at once: what a stream
    # holds is waiting or being handled, and its first entry is the oldest of them.
    now = time.time()
    partitions = range(store.partitions)
    async with store.redis.pipeline(transaction=False) as pipe:
        for p in partitions:
            pipe.xlen(store.inbox_key(p))
            pipe.xrange(store.inbox_key(p), count=1)
        for scope in store.scopes:  # one index, or one per partition on a Redis Cluster
            pipe.zcard(keys.stall_key(store.tag(scope)))
            pipe.zcard(keys.hook_due_key(store.tag(scope)))
        pipe.zcount(workers_key, int((now - alive_s) * 1000), "+inf")
        replies = await pipe.execute()
    dead = await store.dead_letters()
    due_n = sum([await store.due_count(scope) for scope in store.scopes])
    depth = GaugeMetricFamily(
        "notifier_inbox_depth",
        "Transitions in a partition's inbox not yet acknowledged (waiting or being handled).",
        labels=["partition"],
    )
    oldest = GaugeMetricFamily(
        "notifier_inbox_oldest_age_seconds",
        "Age of the oldest transition in a partition's inbox (0 when it is empty).",
        labels=["partition"],
    )
    for p in partitions:
        length, first = replies[2 * p], replies[2 * p + 1]
        depth.add_metric([str(p)], int(length))
        entry_id = first[0][0] if first else None
        age = entry_age_s(_text(entry_id), now) if entry_id is not None else 0.0
        oldest.add_metric([str(p)], age)
    indexes, workers_n = replies[2 * len(partitions) : -1], replies[-1]
    stall_n, hooks_n = sum(indexes[0::2]), sum(indexes[1::2])
    families: list[Metric] = [depth, oldest]
    for name, doc, value in (
        ("notifier_due_messages", "Messages waiting for their time (deferred or retrying).", due_n),
        ("notifier_stall_watch", "Shipments watched for going quiet.", stall_n),
        (
            "notifier_merchant_hook_queue",
            "Merchant webhook events waiting to go out (or being sent, or waiting to retry).",
            hooks_n,
        ),
        ("notifier_workers_alive", f"Workers that beat in the last {alive_s:g} s.", workers_n),
    ):
        gauge = GaugeMetricFamily(name, doc)
        gauge.add_metric([], int(value))
        families.append(gauge)
    letters = GaugeMetricFamily(
        "notifier_dead_letters",
        "Entries in the dead-letter lists now (see `notifier dead-letters`).",
        labels=["kind"],
    )
    for kind, n in dead.items():
        letters.add_metric([kind], n)
    families.append(letters)
    return families


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def exposition(extra: list[Metric]) -> bytes:
    """The text exposition: this process's (or every process's) values and ``extra``."""
    directory = _state["dir"]
    if isinstance(directory, Path):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    else:
        registry = _metrics.registry
    registry.register(snapshot := _Snapshot(extra))
    try:
        return generate_latest(registry)
    finally:
        registry.unregister(snapshot)
