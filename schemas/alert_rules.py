"""Alert rules as they are stored and read: one typed model per rule type, validated with
errors that name the field, and the record of the rules topic (schemas/topics.py
ALERT_RULES_TOPIC, compacted, keyed by ``rule_key``).

A rule belongs to an org (``org_id``) or is global (``org_id == GLOBAL``, an operator's rule
applied to every org). What it watches is a number the evaluator measures for each
subject (an org, or one API key of it) and compares with the rule's ``condition()``:

    type                    measured value                               fires when
    usage_threshold         window count, or % of the window's limit      value >= threshold
    rate_limit_violations   denials (429s) in the window                  value >= min_denials
    quota_exceeded          % of the window's limit used                  value >= 100
    error_rate              % of 5xx among requests (>= min_requests)     value >= threshold
    latency_p95             p95 latency in ms (>= min_requests)           value >= threshold
    unusual_activity        robust score of the volume (alerts/baseline)  value >= threshold
    key_expiring            seconds until the key expires                 value <= threshold

Channels are named, never inlined: a rule lists channel names, and the channels (with
their secrets: webhook secrets, Slack URLs, SMTP passwords) are configured in
QUOTAFLOW_ALERT_CHANNELS, so that no secret is ever written to Kafka.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from quotaflow.schemas.ids import ID_MAX, ID_PATTERN, ID_RULE

GLOBAL = "*"  # org_id of an operator's rule: applies to every org
SEVERITIES = ("low", "medium", "high", "critical")
Severity = Literal["low", "medium", "high", "critical"]
CHANNEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
MAX_CHANNELS = 8
MAX_DURATION_S = 366 * 86400
RULE_RECORD_VERSION = 1
DEFAULT_GROUP_WAIT_S = 2  # a rule about each key: keys crossing together are one notification
DEFAULT_GROUP_INTERVAL_S = 30

_DURATION = re.compile(r"^\s*([0-9]{1,9})\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, None: 1}


def parse_duration(value: Any) -> Any:
    """Seconds from 300, "300", "300s", "5m", "1h", "1d" or "1w"; anything else is left to
    the field's own check (which names the field)."""
    if isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if m is None:
            raise ValueError("expected a duration: seconds, or a number with s, m, h, d or w (e.g. 5m)")
        number, unit = int(m.group(1)), m.group(2)
        if unit == "ms":
            raise ValueError("durations are whole seconds or more (s, m, h, d, w)")
        return number * _UNIT_S[unit]
    return value


def parse_window(value: Any) -> Any:
    """A window's label as the limit policy names it ("60s", "3600s"), from a duration."""
    seconds = parse_duration(value)
    if isinstance(seconds, int) and not isinstance(seconds, bool):
        if seconds < 1:
            raise ValueError("a window is at least 1 s long")
        return f"{seconds}s"
    return value


Duration = Annotated[int, BeforeValidator(parse_duration), Field(ge=0, le=MAX_DURATION_S)]
WindowLabel = Annotated[str, BeforeValidator(parse_window), Field(pattern=r"^[1-9][0-9]{0,8}s$")]
Id = Annotated[str, Field(pattern=ID_PATTERN, max_length=ID_MAX)]
ChannelName = Annotated[str, Field(pattern=CHANNEL_NAME_PATTERN)]


class Condition(BaseModel):
    """What the state machine (alerts/state.py) compares the measured value with: fires when
    the value reaches ``threshold`` (``above``: >=, ``below``: <=), clears only once it is
    back past ``clear_at`` (hysteresis), so a value hovering at the threshold does not flap."""

    model_config = ConfigDict(frozen=True)
    threshold: float
    direction: Literal["above", "below"] = "above"
    clear_at: float

    def reached(self, value: float) -> bool:
        return value >= self.threshold if self.direction == "above" else value <= self.threshold

    def cleared(self, value: float) -> bool:
        return value < self.clear_at if self.direction == "above" else value > self.clear_at


class _Rule(BaseModel):
    """What every rule type has."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    rule_id: Id
    org_id: Annotated[str, Field(pattern=rf"^(?:{ID_PATTERN[1:-1]}|\{GLOBAL})$", max_length=ID_MAX)]
    description: Annotated[str, Field(max_length=500)] = ""
    severity: Severity = "medium"
    for_s: Duration = Field(0, description="how long the condition must hold before the alert fires")
    cooldown_s: Duration = Field(0, description="after an alert fired, how long before it may fire again")
    repeat_interval_s: Duration | None = Field(None, description="while firing, notify again this often; None: once")
    hysteresis: float = Field(0.1, ge=0, le=0.9, description="fraction of the threshold the value must fall back "
                                                             "past before the alert resolves")
    channels: Annotated[tuple[ChannelName, ...], Field(min_length=1, max_length=MAX_CHANNELS)]
    enabled: bool = True
    # Grouping (as Alertmanager's group_wait and group_interval, per org and rule): the
    # alerts of this rule about one org that fire (or resolve) within group_wait_s of the
    # first are notified together, in one notification listing them; after a group's
    # notification, alerts joining it wait until group_interval_s has passed since.
    group_wait_s: Duration | None = Field(None, le=3600, description="how long a group waits for more alerts before "
                                                                     "its notification; None: DEFAULT_GROUP_WAIT_S "
                                                                     "for a rule about each key of an org, 0 (no "
                                                                     "wait, no grouping) for a rule about one subject")
    group_interval_s: Duration = Field(DEFAULT_GROUP_INTERVAL_S, le=86400,
                                       description="after a group's notification, the least time before its next")

    @model_validator(mode="after")
    def _distinct_channels(self) -> "_Rule":
        if len(set(self.channels)) != len(self.channels):
            raise ValueError("channels: a channel is listed twice")
        if self.repeat_interval_s is not None and self.repeat_interval_s < 60:
            raise ValueError("repeat_interval_s: at least 60 s (or null: notify once per firing)")
        return self

    @property
    def is_global(self) -> bool:
        return self.org_id == GLOBAL

    @property
    def many_subjects(self) -> bool:
        """Whether the rule alerts about each key of an org (several alerts per org)."""
        return getattr(self, "scope", "key") == "key" and getattr(self, "api_key_id", None) is None

    @property
    def group_wait(self) -> int:
        """The group wait in effect (0: each alert notified on its own, at once)."""
        if self.group_wait_s is not None:
            return self.group_wait_s
        return DEFAULT_GROUP_WAIT_S if self.many_subjects else 0

    def _above(self, threshold: float) -> Condition:
        return Condition(threshold=threshold, direction="above", clear_at=threshold * (1 - self.hysteresis))

    def condition(self) -> Condition:  # pragma: no cover - every type defines it
        raise NotImplementedError


class _Scoped(_Rule):
    """Rules about an org's traffic as a whole (scope "org") or about its keys (scope "key":
    one key when api_key_id is given, else each key of the org on its own)."""

    scope: Literal["org", "key"] = "org"
    api_key_id: Id | None = None

    @model_validator(mode="after")
    def _key_needs_key_scope(self) -> "_Scoped":
        if self.api_key_id is not None and self.scope != "key":
            raise ValueError("api_key_id: only with scope \"key\"")
        return self


class UsageThreshold(_Scoped):
    """A window's count reached a percentage of the window's limit, or an absolute count."""

    type: Literal["usage_threshold"] = "usage_threshold"
    window: WindowLabel
    percent: float | None = Field(None, gt=0, le=1000)
    count: int | None = Field(None, ge=1, le=2**53 - 1)

    @model_validator(mode="after")
    def _one_threshold(self) -> "UsageThreshold":
        if (self.percent is None) == (self.count is None):
            raise ValueError("percent, count: give exactly one (a % of the window's limit, or a number of requests)")
        return self

    def condition(self) -> Condition:
        return self._above(self.percent if self.percent is not None else float(self.count))


class RateLimitViolations(_Scoped):
    """More than ``min_denials`` requests refused (429) in the window."""

    type: Literal["rate_limit_violations"] = "rate_limit_violations"
    window: WindowLabel
    min_denials: int = Field(1, ge=1, le=2**53 - 1)

    def condition(self) -> Condition:
        return self._above(float(self.min_denials))


class QuotaExceeded(_Scoped):
    """A window's limit is used up (100 % of it): the next request is refused."""

    type: Literal["quota_exceeded"] = "quota_exceeded"
    window: WindowLabel

    def condition(self) -> Condition:
        return self._above(100.0)


class ErrorRate(_Scoped):
    """The share of 5xx responses in the window over ``percent``, once the window has at least
    ``min_requests`` requests (a few errors in a quiet hour are not a spike)."""

    type: Literal["error_rate"] = "error_rate"
    window: WindowLabel
    percent: float = Field(gt=0, le=100)
    min_requests: int = Field(20, ge=1)

    def condition(self) -> Condition:
        return self._above(self.percent)


class LatencyP95(_Scoped):
    """The window's 95th percentile latency over ``threshold_ms`` (with ``min_requests``)."""

    type: Literal["latency_p95"] = "latency_p95"
    window: WindowLabel
    threshold_ms: float = Field(gt=0, le=3_600_000)
    min_requests: int = Field(20, ge=1)

    def condition(self) -> Condition:
        return self._above(self.threshold_ms)


class UnusualActivity(_Scoped):
    """The volume of the last hour is far from the same hour's baseline: a robust score
    (median and MAD of the same hour of the week over ``baseline_weeks``; while fewer
    than ``min_history`` of those exist, of the hours just before: alerts/baseline.py)
    of at least ``score``. ``direction``: an unusual rise, drop, or either."""

    type: Literal["unusual_activity"] = "unusual_activity"
    score: float = Field(4.0, gt=0, le=100)
    direction: Literal["up", "down", "both"] = "up"
    baseline_weeks: int = Field(4, ge=1, le=52)
    min_history: int = Field(3, ge=2, le=52)
    min_requests: int = Field(20, ge=0, description="hours quieter than this (now and in the baseline) never fire")

    @model_validator(mode="after")
    def _history_fits(self) -> "UnusualActivity":
        if self.min_history > self.baseline_weeks:
            raise ValueError("min_history: at most baseline_weeks")
        return self

    def condition(self) -> Condition:
        return self._above(self.score)  # the score is signed by direction (alerts/baseline.py)


class KeyExpiring(_Rule):
    """An API key expires within ``within_s`` (each key of the org, or one)."""

    type: Literal["key_expiring"] = "key_expiring"
    api_key_id: Id | None = None
    within_s: Duration = Field(7 * 86400, ge=60)
    hysteresis: float = Field(0.0, ge=0, le=0.9)

    def condition(self) -> Condition:
        # below: fires when the time left is at most within_s; resolves once the key's
        # expiry moves further away (renewed) than within_s plus the hysteresis.
        return Condition(threshold=float(self.within_s), direction="below",
                         clear_at=self.within_s * (1 + self.hysteresis))


Rule = Annotated[Union[UsageThreshold, RateLimitViolations, QuotaExceeded, ErrorRate, LatencyP95, UnusualActivity,
                       KeyExpiring], Field(discriminator="type")]
RULE_TYPES = ("usage_threshold", "rate_limit_violations", "quota_exceeded", "error_rate", "latency_p95",
              "unusual_activity", "key_expiring")
_RULE = TypeAdapter(Rule)


class InvalidRule(ValueError):
    """A rule that cannot be stored: the message names each field and what is wrong (never
    the value, which may be long or hostile)."""


_PATTERN_RULES = {
    "rule_id": f"must be {ID_RULE}",
    "api_key_id": f"must be {ID_RULE}",
    "org_id": f"must be {ID_RULE}, or {GLOBAL} for a global rule",
    "channels": "a channel name is 1-64 lower-case letters, digits and _.- starting with a letter or digit",
    "window": "expected a window length such as 60s, 1h or 1d",
}


def describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] in RULE_TYPES:
            loc = loc[1:]  # the union's tag, not a field
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_invalid":
            message = f"unknown rule type; one of {', '.join(RULE_TYPES)}"
            loc = ["type"]
        elif err["type"] == "union_tag_not_found":
            message = f"missing; one of {', '.join(RULE_TYPES)}"
            loc = ["type"]
        elif err["type"] == "extra_forbidden":
            message = "unknown field for this rule type"
        elif err["type"] == "string_pattern_mismatch" and loc:
            message = _PATTERN_RULES.get(loc[0], message)
        field = ".".join(loc)
        problems.append(message if (not field or message.startswith(f"{field}:")) else f"{field}: {message}")
    return "; ".join(" ".join(p.split()) for p in problems)


def parse_rule(data: Any) -> Rule:
    """A rule from a dict or JSON bytes/str; InvalidRule names every problem."""
    try:
        if isinstance(data, (str, bytes, bytearray)):
            return _RULE.validate_json(data)
        return _RULE.validate_python(data)
    except ValidationError as exc:
        raise InvalidRule(describe(exc)) from None


def rule_key(org_id: str, rule_id: str) -> bytes:
    """The rules topic's key of a rule: rule ids are unique within their org ("*": global)."""
    return f"{org_id}/{rule_id}".encode()


class RuleRecord(BaseModel):
    """A value of the rules topic: the rule and its bookkeeping. A removed rule is a
    tombstone (a null value under its key), which compaction eventually drops."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    record_version: Literal[1] = RULE_RECORD_VERSION
    rule: Rule
    version: int = Field(1, ge=1, description="+1 per change of the rule")
    created_ms: int = Field(ge=0)
    updated_ms: int = Field(ge=0)
    actor: Annotated[str, Field(max_length=128)] = ""

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, data: bytes) -> "RuleRecord":
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise InvalidRule(describe(exc)) from None


class Silence(BaseModel):
    """Mute notifications of a rule (``rule_id``) or of every rule (None) for an org (or
    every org: GLOBAL) from ``starts_ms`` until ``ends_ms``. Alerts still change state
    while muted; a firing that is still on when the silence ends is notified then."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    silence_id: Id
    org_id: Annotated[str, Field(pattern=rf"^(?:{ID_PATTERN[1:-1]}|\{GLOBAL})$", max_length=ID_MAX)]
    rule_id: Id | None = None
    starts_ms: int = Field(0, ge=0)
    ends_ms: int = Field(ge=0)
    comment: Annotated[str, Field(max_length=500)] = ""

    def mutes(self, rule_org_id: str, rule_id: str, org_id: str, now_ms: int) -> bool:
        """Whether this silence mutes, at ``now_ms``, rule ``rule_org_id/rule_id`` alerting about ``org_id``."""
        if not self.starts_ms <= now_ms < self.ends_ms:
            return False
        if self.org_id != GLOBAL and self.org_id != org_id:
            return False
        return self.rule_id is None or (self.rule_id == rule_id and self.org_id in (rule_org_id, org_id))
