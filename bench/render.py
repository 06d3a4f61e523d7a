"""Micro-benchmark: render one message from compiled templates (email with CSS inlining, SMS).

Run: .venv/bin/python -m bench.render [--seconds 2] [--runs 5]
Prints the median time per message over several runs, cycling through every milestone in
several locales (templates are compiled once, as in the worker): rendered in full, and
filled into the shape's skeleton as the worker does (``notifier/render/skeleton.py``). The
dates' cache is emptied before each pass, so each pass formats its dates again.
"""

from __future__ import annotations

import statistics
import time

from bench._cli import arguments, save
from notifier.check import samples as _samples
from notifier.models import ChannelKind, Notification, Recipient
from notifier.render import Renderer, i18n
from notifier.render.environment import TemplateStore
from notifier.render.i18n import Catalogs
from notifier.resources import data_dir

LOCALES = ["en", "fr", "de", "ja", "ar"]


def notifications(channel: ChannelKind) -> list[Notification]:
    return [
        Notification(
            notification_id="n_bench",
            merchant_id="acme",
            shipment_id="s",
            channel=channel,
            to="ana@example.com" if channel is ChannelKind.EMAIL else "+33612345678",
            transition=t,
            created_at=t.occurred_at,
            recipient=Recipient(
                name="Ana",
                email="ana@example.com",
                phone="+33612345678",
                locale=locale,
                timezone="Europe/Paris",
            ),
        )
        for t in _samples()
        for locale in LOCALES
    ]


def run(renderer: Renderer, items: list[Notification], seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        i18n._when.cache_clear()
        i18n._window.cache_clear()
        for n in items:
            renderer.render(n)
        done += len(items)
    return (time.perf_counter() - started) / done * 1000


def main() -> None:
    args = arguments(__doc__)
    catalogs = Catalogs(data_dir("locales", None))
    result: dict[str, object] = {"benchmark": "render", "unit": "ms/message", "target": 0.5}
    for way, skeletons in (("full", 0), ("skeleton", 1024)):
        renderer = Renderer(
            TemplateStore(data_dir("templates", None), catalogs),
            catalogs,
            email_from="notifications@example.com",
            skeletons=skeletons,
        )
        for channel in ChannelKind:
            items = notifications(channel)
            run(renderer, items, 0.2)  # compile every template (and trace every skeleton)
            times = [run(renderer, items, args.seconds) for _ in range(args.runs)]
            name = str(channel) if way == "skeleton" else f"{channel} {way}"
            result[name] = {"median": statistics.median(times), "runs": times}
            print(
                f"render {channel} ({way}): median {statistics.median(times):.3f} ms/message "
                f"over {args.runs} runs ({', '.join(f'{t:.3f}' for t in times)}; target 0.5)"
            )
    save(result, args.json)


if __name__ == "__main__":
    main()
