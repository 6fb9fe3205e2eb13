"""How unusual an hour's volume is, as a robust score: how many (scaled) median absolute
deviations it lies from the median of its baseline.

The baseline is the same hour of the week in the weeks before (``seasonal``: traffic at
3 am on a Sunday is compared with 3 am on other Sundays). Seasonal history takes weeks to
build (Datadog's weekly seasonality needs three), so while fewer than ``min_history``
such hours exist, the hours just before stand in (``recent``); with fewer than
``min_history`` of those either, there is no score yet (None: the state machine then
keeps its state).

Median and MAD rather than mean and standard deviation: one past incident in the
baseline (an outage at zero, a spike at ten times) moves neither. The MAD is scaled by
1.4826 so that the score reads like a z-score for normal data; it is floored at
``relative_floor`` of the median and at ``absolute_floor`` requests, so that a perfectly
flat baseline (MAD 0) or a near-silent one does not turn one extra request into an
alert.
"""

from __future__ import annotations

import statistics
from typing import Literal, NamedTuple, Sequence

MAD_SCALE = 1.4826  # 1 / Phi^-1(3/4): the MAD of a normal distribution times this is its sigma
RELATIVE_FLOOR = 0.1
ABSOLUTE_FLOOR = 1.0


class Score(NamedTuple):
    score: float  # signed by direction: high means unusual in the direction watched
    basis: Literal["seasonal", "recent"]
    median: float
    scale: float


def robust_score(value: float, history: Sequence[float], *, direction: Literal["up", "down", "both"] = "up",
                 relative_floor: float = RELATIVE_FLOOR, absolute_floor: float = ABSOLUTE_FLOOR) -> tuple[float, float,
                                                                                                          float]:
    """(score, median, scale) of ``value`` against a non-empty ``history``."""
    median = statistics.median(history)
    mad = statistics.median(abs(x - median) for x in history)
    scale = max(MAD_SCALE * mad, relative_floor * abs(median), absolute_floor) or 1.0  # all zero: no spread to measure
    deviation = (value - median) / scale
    if direction == "down":
        deviation = -deviation
    elif direction == "both":
        deviation = abs(deviation)
    return deviation, median, scale


def unusual(value: float, seasonal: Sequence[float], recent: Sequence[float], *, min_history: int = 3,
            direction: Literal["up", "down", "both"] = "up", min_requests: float = 0,
            relative_floor: float = RELATIVE_FLOOR, absolute_floor: float = ABSOLUTE_FLOOR) -> Score | None:
    """The score of an hour's ``value`` against the same hours of past weeks (``seasonal``),
    or, while fewer than ``min_history`` of those exist, against the ``recent`` hours; None
    while neither has enough, or when the hour and its baseline are both quieter than
    ``min_requests`` (nothing to say about a handful of requests)."""
    if len(seasonal) >= min_history:
        history, basis = seasonal, "seasonal"
    elif len(recent) >= min_history:
        history, basis = recent, "recent"
    else:
        return None
    score, median, scale = robust_score(value, history, direction=direction, relative_floor=relative_floor,
                                        absolute_floor=absolute_floor)
    if value < min_requests and median < min_requests:
        return None
    return Score(score, basis, median, scale)
