"""The life of one alert as pure logic: no clock, no I/O, so that a processor can keep the
state in a Faust table and replay a step after a crash with the same outcome.

One alert is one rule about one subject (an org, or one of its API keys), named by a
stable fingerprint. Each step takes the rule, the value just measured (None: nothing new
to measure, only time has passed), the time, the alert's previous state and the
silences, and returns the new state and what happened:

    inactive --condition--> pending --held for `for_s`, cooldown over--> firing --cleared--> inactive
                               \\--cleared before that (cancelled)--> inactive

- **Edge-triggered.** The condition is a Schmitt trigger (schemas/alert_rules.py
  Condition): it turns on when the value reaches the threshold and off only once the
  value is back past ``clear_at`` (the hysteresis). Between the two it keeps its last
  output, so a value hovering at the threshold fires once and resolves once.
- **for_s.** The trigger must stay on for ``for_s`` before the alert fires; a trigger that
  turns off while pending cancels it, silently. No data (value None) keeps the trigger
  as it was, and ``for_s`` is still counted from the measurement that turned it on: a
  missing measurement never fires an alert on its own (grafana#16290).
- **Cooldown.** An alert does not fire again within ``cooldown_s`` of its last firing; a
  condition that comes back sooner waits in pending, and fires when the cooldown is over
  if it still holds. Every firing notified is followed by exactly one resolved.
- **Repeat.** While firing, the notification is repeated every ``repeat_interval_s``.
- **Silences** mute notifications, not states: a firing muted at the time is notified at
  the first step after the silence ends if it is still on; its resolved is notified only if
  its firing was.
- **Ids.** Each notification's id derives from the fingerprint, the firing's number
  (``episode``) and the kind, so a step replayed after a crash gives the same id (the
  webhook-id receivers dedupe on). Each transition's history row id (``row_id``) is
  derived the same way, never from the clock: a pending or cancelled one from the count
  of the alert's pending periods (``pendings``), so a replayed step writes the same row
  (the history table keeps one row per id) and two transitions never share one.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Literal, NamedTuple

import msgspec

from quotaflow.schemas.alert_rules import Rule, Silence

INACTIVE, PENDING, FIRING = "inactive", "pending", "firing"
Status = Literal["inactive", "pending", "firing"]
# What a step can report; notifications go out for firing, repeat and resolved only.
Kind = Literal["pending", "cancelled", "firing", "repeat", "resolved"]
NOTIFIED_KINDS = ("firing", "repeat", "resolved")


class Subject(NamedTuple):
    """What an alert is about: an org, or one API key of it."""

    org_id: str
    api_key_id: str | None = None


def fingerprint(rule: Rule, subject: Subject) -> str:
    """The alert's stable name: the same rule (by org and id, whatever its edits) about the
    same subject always has the same fingerprint, in every process."""
    text = "\x1f".join((rule.org_id, rule.rule_id, subject.org_id, subject.api_key_id or ""))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class AlertState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What is remembered of an alert between steps (a Faust table's value, JSON)."""

    status: Status = INACTIVE
    triggered: bool = False  # the Schmitt trigger's output
    since_ms: int | None = None  # pending: when the trigger turned on; firing: when it fired
    episode: int = 0  # firings so far; the current (or last) one's number
    fired_ms: int | None = None  # when the last firing began (the cooldown counts from it)
    notified: bool = False  # the current firing was notified (it was not muted)
    last_notified_ms: int | None = None  # the current firing's last notification (firing or repeat)
    repeats: int = 0  # repeats of the current firing so far
    value: float | None = None  # the last value measured
    pendings: int = 0  # pending periods so far (names their history rows: row_id)

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> "AlertState":
        return msgspec.json.decode(data, type=cls)


class Transition(msgspec.Struct, frozen=True):
    """Something that happened to an alert in a step. ``notify``: a notification goes out,
    with ``notification_id`` (stable across replays)."""

    fingerprint: str
    kind: Kind
    from_status: Status
    to_status: Status
    at_ms: int
    value: float | None
    threshold: float
    episode: int
    notify: bool
    notification_id: str | None = None
    muted: bool = False  # a notification a silence held back
    row_id: str = ""  # its history row's id: the same when the step is replayed (transition_row_id)


class Step(NamedTuple):
    state: AlertState
    transitions: list[Transition]


def notification_id(fp: str, episode: int, kind: str, repeat: int = 0) -> str:
    """The id of a notification (webhook-id): the same for the same firing and kind."""
    return f"msg_{fp}_{episode}_{kind}" + (f"_{repeat}" if kind == "repeat" else "")


def transition_row_id(fp: str, kind: str, episode: int, pendings: int, notification: str | None,
                      was_muted: bool) -> str:
    """The history row id of a transition: a notification's id for what notifies (with
    ``_muted`` for a firing a silence held back: its later notification is a row of its own);
    a resolved one's per firing; a pending or cancelled one's per pending period."""
    if notification is not None:
        return notification + ("_muted" if was_muted else "")
    if kind in ("pending", "cancelled"):
        return f"hist_{fp}_p{pendings}_{kind}"
    return f"hist_{fp}_{episode}_{kind}"


def muted(rule: Rule, subject: Subject, now_ms: int, silences: Iterable[Silence]) -> bool:
    return any(s.mutes(rule.org_id, rule.rule_id, subject.org_id, now_ms) for s in silences)


def step(rule: Rule, subject: Subject, value: float | None, now_ms: int, state: AlertState | None = None,
         silences: Iterable[Silence] = ()) -> Step:
    """The alert's next state and its transitions (at most one state change, plus a
    notification held back by a silence that has ended, or a repeat)."""
    state = state or AlertState()
    fp = fingerprint(rule, subject)
    condition = rule.condition()
    quiet = muted(rule, subject, now_ms, silences)
    out: list[Transition] = []

    def event(kind: Kind, to: Status, *, notify: bool = False, repeat: int = 0, was_muted: bool = False,
              episode: int | None = None, pendings: int | None = None) -> None:
        ep = state.episode if episode is None else episode
        nid = notification_id(fp, ep, kind, repeat) if (notify or was_muted) else None
        row = transition_row_id(fp, kind, ep, state.pendings if pendings is None else pendings, nid, was_muted)
        out.append(Transition(fp, kind, state.status, to, now_ms, value, condition.threshold, ep, notify, nid,
                              was_muted, row))

    triggered = state.triggered
    if not rule.enabled:
        triggered = False  # a disabled rule resolves what it had fired, and fires nothing
    elif value is not None:
        if condition.reached(value):
            triggered = True
        elif condition.cleared(value):
            triggered = False
    measured = value if value is not None else state.value

    if state.status == FIRING:
        if not triggered:
            event("resolved", INACTIVE, notify=state.notified)
            return Step(AlertState(INACTIVE, False, None, state.episode, state.fired_ms, False, None, 0, measured,
                                   state.pendings), out)
        if not state.notified:  # muted so far
            if quiet:
                return Step(msgspec.structs.replace(state, value=measured), out)
            event("firing", FIRING, notify=True)
            return Step(msgspec.structs.replace(state, notified=True, last_notified_ms=now_ms, value=measured), out)
        interval = rule.repeat_interval_s
        if interval is not None and state.last_notified_ms is not None \
                and now_ms - state.last_notified_ms >= interval * 1000 and not quiet:
            event("repeat", FIRING, notify=True, repeat=state.repeats + 1)
            return Step(msgspec.structs.replace(state, last_notified_ms=now_ms, repeats=state.repeats + 1,
                                                value=measured), out)
        return Step(msgspec.structs.replace(state, value=measured), out)

    if not triggered:
        if state.status == PENDING:
            event("cancelled", INACTIVE)
        return Step(AlertState(INACTIVE, False, None, state.episode, state.fired_ms, False, None, 0, measured,
                               state.pendings), out)

    since = state.since_ms if state.status == PENDING and state.since_ms is not None else now_ms
    held = now_ms - since >= rule.for_s * 1000
    cooled = state.fired_ms is None or now_ms - state.fired_ms >= rule.cooldown_s * 1000
    if held and cooled:
        episode = state.episode + 1
        event("firing", FIRING, notify=not quiet, was_muted=quiet, episode=episode)
        return Step(AlertState(FIRING, True, now_ms, episode, now_ms, not quiet, None if quiet else now_ms, 0,
                               measured, state.pendings), out)
    pendings = state.pendings
    if state.status != PENDING:
        pendings += 1
        event("pending", PENDING, pendings=pendings)
    return Step(AlertState(PENDING, True, since, state.episode, state.fired_ms, False, None, 0, measured, pendings),
                out)


class Alerts:
    """The states of many alerts in memory, for callers that keep them in one process (and
    tests): ``observe`` steps one alert and remembers its state by fingerprint."""

    def __init__(self) -> None:
        self.states: dict[str, AlertState] = {}

    def observe(self, rule: Rule, subject: Subject, value: float | None, now_ms: int,
                silences: Iterable[Silence] = ()) -> list[Transition]:
        fp = fingerprint(rule, subject)
        result = step(rule, subject, value, now_ms, self.states.get(fp), silences)
        self.states[fp] = result.state
        return result.transitions
