"""When a node certificate is renewed: a pure rule, so that rotation (a later issue) plans it like everything else.

A certificate is renewed once two thirds of its life have passed (Swarm renews between 50 and 80 %): a 90-day
certificate at day 60, leaving a month for a node that is down or cut off to come back and renew.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

RENEW_AT = 2 / 3


class Renewal(Enum):
    KEEP = "keep"
    RENEW = "renew"
    EXPIRED = "expired"  # too late to renew with it: the node must join again (recovery is a later issue)


@dataclass(frozen=True)
class RenewalPlan:
    action: Renewal
    renew_at: datetime  # when the certificate is (or was) due for renewal
    expires_in: timedelta  # negative once expired


def renew_at(not_before: datetime, not_after: datetime) -> datetime:
    return not_before + (not_after - not_before) * RENEW_AT


def plan_renewal(not_before: datetime, not_after: datetime, now: datetime) -> RenewalPlan:
    """Keep, renew or (expired) join again, for a certificate valid from `not_before` to `not_after`."""
    due = renew_at(not_before, not_after)
    left = not_after - now
    if left <= timedelta(0):
        return RenewalPlan(Renewal.EXPIRED, due, left)
    return RenewalPlan(Renewal.RENEW if now >= due else Renewal.KEEP, due, left)
