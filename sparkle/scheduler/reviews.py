"""When the scheduler reviews a plan (folds new measurements in and decides its placement again): often while
its signature is new, geometrically less often after, never so often that reviews cost more than a small share of
the calls between them; and not at all after a first call that ran as its decision expected.

Pure functions of a decision: the scheduler keeps the counts and what a review costs here.
"""

from __future__ import annotations

import math

LONGEST_INTERVAL = 1024  # calls between reviews at most (the cost share decides for calls of ~10 us and more)
CONFIDENT = 0.95  # a choice at least this likely to be the fastest is reviewed less often (_stride)
# Scheduled reviews cost at most this share of the time of the calls between them: a review costs 0.1-0.25 ms,
# as much as a small call; reviewing a 50 us call at its 2nd, 3rd and 5th calls doubled those calls' cost.
COST_SHARE = 0.05
FIRST_GUESS_SECONDS = 150e-6  # a review's cost before a scheduler has timed its own
# The fast path's bookkeeping (two clock reads, a lock, the history's update, a record) costs 5-7 us on the
# 2-core Zen 1 VM: 40 % of a 12 us call. Calls predicted to take less than SAMPLE_BELOW_SECONDS are timed and
# recorded one in ceil(SAMPLE_BELOW_SECONDS / predicted), at most one in SAMPLE_EVERY_MAX; the others are counted.
SAMPLE_BELOW_SECONDS = 200e-6
SAMPLE_EVERY_MAX = 16
# A signature's first calls are each timed all the same: what is learned early matters most, and a short run
# (a notebook, a demo) sees every call in history().
SAMPLE_AFTER_CALLS = 64


def spacing(calls, decision, review_seconds):
    """Calls until the next scheduled review: geometric in the calls so far (a new signature is reviewed often,
    an old one rarely), and never so soon that reviews cost more than COST_SHARE of the calls' own time
    (the chosen device's predicted seconds). A change of regime on the device still calls a review at once."""
    geometric = max(1, calls) * _stride(decision)
    seconds = decision.predicted_seconds
    affordable = math.ceil(review_seconds / (COST_SHARE * seconds)) if 1e-9 < seconds < math.inf else 1
    return min(LONGEST_INTERVAL, max(geometric, affordable))


def sample_period(calls, sample_every):
    """How many calls the next timed call of a plan will stand for: one until SAMPLE_AFTER_CALLS calls of its
    signature, then its ``sample_every``."""
    return 1 if calls < SAMPLE_AFTER_CALLS else sample_every


def sample_stride(predicted_seconds):
    """One fast-path call in how many is timed and recorded: 1 for calls of SAMPLE_BELOW_SECONDS and more (the
    bookkeeping is then under 3 % of a call), up to SAMPLE_EVERY_MAX for the smallest. A change of regime is
    then seen after REGIME_STREAK timed calls, a few hundred microseconds of calls at most."""
    if not predicted_seconds > 0.0:  # unknown (nan, 0): time every call
        return 1
    return max(1, min(SAMPLE_EVERY_MAX, math.ceil(SAMPLE_BELOW_SECONDS / predicted_seconds)))


def premise_seconds(decision, device):
    """What the fastest other usable device is predicted to take: calls on ``device`` slower than this question
    the decision (infinite where there is no other)."""
    return min((p.seconds for p in decision.predictions if p.device != device and p.usable), default=math.inf)


def confirms(decision, device, seconds):
    """Whether a call measured on the decided device (``seconds``) leaves the decision as it was: still faster
    than what every other usable device is predicted to take."""
    return seconds <= premise_seconds(decision, device)


def _stride(decision):
    """How much further the next review lies than the calls so far: a confident choice (the device measured there,
    the others very likely slower) is reviewed 4x less often. A review costs about 0.15 ms (the 2-core VM),
    as much as a small call itself; a change of regime on the device still calls a review at once."""
    chosen = next((p for p in decision.predictions if p.device == decision.device), None)
    if chosen is not None and chosen.measured_calls and decision.confidence >= CONFIDENT:
        return 4
    return 1
