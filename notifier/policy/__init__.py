"""Cadence policy: rules loaded from policies/ and the pure decide() engine."""

from notifier.policy.engine import (
    Step,
    Verdict,
    decide,
    fold,
    is_old,
    opt_out_key,
    quiet_until,
)
from notifier.policy.rules import Policy, PolicyStore

__all__ = [
    "Policy",
    "PolicyStore",
    "Step",
    "Verdict",
    "decide",
    "fold",
    "is_old",
    "opt_out_key",
    "quiet_until",
]
