"""What every benchmark's command line shares: --seconds, --runs, --json."""

from __future__ import annotations

import argparse
import json
from typing import Any


def arguments(description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one run")
    parser.add_argument("--runs", type=int, default=5, help="runs to take the median of")
    parser.add_argument("--json", help="also write the result to this file")
    return parser.parse_args()


def save(result: dict[str, Any], path: str | None) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
