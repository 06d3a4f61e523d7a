"""Cadence policy: rules loaded from policies/ and the pure decide() engine."""

from notifier.policy.engine import Verdict, decide
from notifier.policy.rules import Policy, PolicyStore

__all__ = ["Policy", "PolicyStore", "Verdict", "decide"]
