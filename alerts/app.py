"""The alerts stage: a Faust app of its own (group ALERTS_APP_ID) on the events topic,
evaluating the alert rules on the stream and delivering their notifications, exactly one
per transition.

- **Rules and silences** are read from their compacted topics by a task that follows them
  while the stage runs (alerts/sources.py): a rule added is evaluated from its next step,
  without a restart.
- **Measures** (alerts/measures.py) are counted per subject from each batch of events,
  in the table ``alert-measures``; each subject remembers the next offset of each
  partition it has applied, so records read again after a crash are not counted twice.
- **Evaluation** (alerts/evaluate.py, alerts/state.py) runs after each batch for the orgs
  it touched, and every ``alerts_eval_interval_s`` for every org (windows end, ``for_s``
  and cooldowns pass without events).
- **Exactly one notification per transition.** An alert's state lives in the table
  ``alert-state`` (keyed by fingerprint) with its *outbox*: the notifications of its
  transitions not yet delivered, each with the channels still to do. A transition and
  its notification (with its deterministic id, alerts/state.py notification_id) are on
  the broker, in the table's changelog, before the first attempt to send it; a channel
  is struck from the outbox once delivered (or dead-lettered). A stage killed anywhere
  in between recovers the table and sends what the outbox still holds, with the same
  id: a receiver may see one notification twice, with one id (and dedupe on it), never
  two ids for one transition.
- **Grouping** (alerts/grouping.py): a rule with a group wait (by default a rule about
  each key) sends its alerts about one org through the org's group, a record of the same
  table with an outbox of its own: the notifications waiting within the group wait become
  one notification listing them, recorded in the group's outbox (and struck from the
  alerts') before it is sent, so across a crash it is sent once, with one id.
- **History**: every transition and delivery attempt is a record on ALERT_HISTORY_TOPIC
  (schemas/alert_history.py), stored in ClickHouse by the sink.

Both tables are written as the processor writes its own (our producer, records in the
changelog format Faust recovers from: processors/output.py), to the partition of the
org's events (schemas/events.py partition_of), where Faust recovers them for whichever
worker holds that partition. Run one alerts process per cluster (a second one shares the
partitions; each org is then evaluated by the worker its events reach).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import warnings
from typing import Any

import faust
import msgspec
import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge

from quotaflow.alerts import evaluate, faust_start, grouping, notifications, sources
from quotaflow.alerts.rollups import RollupBaselines
from quotaflow.alerts.channels import Outcome, deliver, kafka_dead_letters
from quotaflow.alerts.measures import WEEK_MS, Measures, hour_like_now, subject_key
from quotaflow.alerts.state import NOTIFIED_KINDS, AlertState, Subject, Transition, fingerprint, step
from quotaflow.core.redis_clients import async_client
from quotaflow.core.retry import GaveUp, pause_until, retry
from quotaflow.core.settings import Settings
from quotaflow.schemas.alert_history import DELIVERY, TRANSITION, HistoryRecord
from quotaflow.schemas.alert_notifications import Notification
from quotaflow.schemas.alert_rules import GLOBAL, Rule
from quotaflow.schemas.events import FORWARDED_HEADER, FIELD_NAMES, decode_columns, partition_of, time_bounds_from_settings
from quotaflow.schemas.limits import parse_overrides, policy_from_settings
from quotaflow.schemas.api_keys import KeyRecord
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, api_key_index, org_key, overrides_key
from quotaflow.schemas.topics import ALERT_HISTORY_TOPIC, ALERTS_APP_ID, EVENTS_TOPIC

log = logging.getLogger(__name__)

READY = Gauge("quotaflow_alerts_ready", "1 once partitions are assigned and tables recovered")
TRANSITIONS = Counter("quotaflow_alerts_transitions_total", "Alert transitions, by kind", ["kind"])
EVENTS = Counter("quotaflow_alerts_events_total", "Events read by the alerts stage, by outcome", ["outcome"])
OUTBOX = Gauge("quotaflow_alerts_outbox_notifications", "Notifications recorded and not yet delivered")

MEASURES_TABLE = "alert-measures"
STATE_TABLE = "alert-state"
_ORG, _KEY, _TS, _STATUS, _LATENCY = (FIELD_NAMES.index(n) for n in ("org_id", "api_key_id", "ts_ms", "status",
                                                                      "latency_ms"))
LIMITS_TTL_S = 5.0  # tiers and key overrides are read from Redis at most this often per subject
KEYS_TTL_S = 5.0  # an org's key registry (key_expiring rules), as often
FORGET_EVERY_S = 60.0

_stopping = asyncio.Event()
pause = pause_until(_stopping)  # retries give up (GaveUp) once the stage is stopping


def _table(app: faust.App, name: str, partitions: int) -> faust.Table:
    return app.Table(name, default=None, partitions=partitions,
                     schema=faust.Schema(key_type=str, key_serializer="json", value_serializer="json"),
                     extra_topic_configs={"segment.ms": str(5 * 60_000), "min.cleanable.dirty.ratio": "0.1"})


class Stage:
    """The stage's work, apart from Faust's plumbing (create_app)."""

    def __init__(self, settings: Settings, measures: faust.Table, states: faust.Table, partitions: int):
        self.settings = settings
        self.policy = policy_from_settings(settings)
        self.bounds = time_bounds_from_settings(settings)
        self.measures, self.states = measures, states
        self.partitions = partitions
        self.sources = sources.Sources(settings.kafka_bootstrap)
        self.redis = async_client(settings)
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True,
                                         acks="all", linger_ms=2)
        self.dead_letters = kafka_dead_letters(self.producer)
        self._limits: dict[tuple[str, str | None], tuple[float, str | None, dict[str, int] | None]] = {}
        self._send_lock = asyncio.Lock()
        self._eval_lock = asyncio.Lock()
        self._deliveries: dict[str, asyncio.Task] = {}  # fingerprint (or group) -> the task delivering its outbox
        self._groups: dict[str, asyncio.Task] = {}  # group -> the task flushing it when due (alerts/grouping.py)
        self._members: dict[str, set[str]] = {}  # group -> the fingerprints that have put notifications in it
        self._unwritten: dict[str, asyncio.Event] = {}  # group -> set once its last flush is on the broker
        self._keys: dict[str, set[str]] = {}  # org -> its keys with measures
        self._registry: dict[str, tuple[float, dict[str, KeyRecord]]] = {}  # org -> (read at, its keys)
        self._next_forget = time.monotonic() + FORGET_EVERY_S
        self.rollups = RollupBaselines.from_settings(settings)
        # How far back a record can still matter: the longest window, with its grace.
        self.horizon_ms = max(w.length_ms for w in self.policy.windows) + self.policy.late_grace_ms

    async def start(self) -> None:
        await self.producer.start()
        await self.sources.start()

    async def stop(self) -> None:
        _stopping.set()
        for task in list(self._deliveries.values()) + list(self._groups.values()):
            task.cancel()
        await self.sources.stop()
        if self.rollups is not None:
            await self.rollups.close()
        await self.producer.stop()
        await self.redis.aclose()

    # --- writing: changelog and history records, on the broker before anything depends on them ---

    def _changelog(self, table: faust.Table, key: str, partition: int) -> tuple:
        """A changelog record of ``key``, its value read when it is sent (the latest)."""
        return (table.changelog_topic.get_topic_name(), orjson.dumps(key), _Current(table, key), partition)

    async def _write(self, records: list[tuple[str, bytes | None, bytes | None, int | None]]) -> None:
        """Send ``records`` (topic, key, value, partition) in their order and return once the
        broker has them all; retried until it does (or the stage stops: GaveUp)."""
        if not records:
            return

        async def attempt() -> None:
            async with self._send_lock:  # one key's records reach its partition in the order made
                futures = [await self.producer.send(t, value=v.value() if isinstance(v, _Current) else v, key=k,
                                                    partition=p) for t, k, v, p in records]
            await asyncio.gather(*futures)

        await retry(attempt, "writing alert state to the broker", on=KafkaError, pause=pause, logger=log)

    def _org_partition(self, org_id: str) -> int:
        return partition_of(org_id, self.partitions)

    # --- a batch of events ---

    async def handle(self, events: list[faust.types.EventT]) -> None:
        if not self.sources.rules.records:
            EVENTS.labels("no_rules").inc(len(events))
            return
        changed: set[str] = set()
        touched: set[str] = set()
        now_ms = int(time.time() * 1000)
        oldest_ms = now_ms - self.horizon_ms
        watched = {org for org, _ in self.sources.rules.records}  # once per batch: a set, not a scan per record
        watch_all = GLOBAL in watched
        for event in events:
            msg = event.message
            if any(k == FORWARDED_HEADER for k, _ in (msg.headers or ())):
                continue  # a copy the processor forwarded: the original was read where it landed
            received_ms = round(msg.timestamp * 1000)  # Faust gives seconds; LogAppendTime on the events topic
            if received_ms < oldest_ms:
                EVENTS.labels("old").inc()
                continue  # nothing a rule measures can hold it any more (a new stage reading the topic)
            if not watch_all and isinstance(msg.key, bytes) and msg.key.decode(errors="replace") not in watched:
                EVENTS.labels("unwatched").inc()
                continue  # keyed by an org without rules (a record keyed otherwise is read to find its org)
            columns = decode_columns(msg.value, received_ms, self.bounds).columns
            if not columns:
                EVENTS.labels("invalid").inc()
                continue
            org = columns[_ORG][0]
            if not watch_all and org not in watched:
                EVENTS.labels("unwatched").inc(len(columns[_ORG]))
                continue
            per_subject: dict[str, list[tuple[int, int, float]]] = {subject_key(org): []}
            for key, ts, status, latency in zip(columns[_KEY], columns[_TS], columns[_STATUS], columns[_LATENCY],
                                                strict=True):
                row = (ts, status, latency)
                per_subject[subject_key(org)].append(row)
                per_subject.setdefault(subject_key(org, key), []).append(row)
                self._keys.setdefault(org, set()).add(key)
            for skey, rows in per_subject.items():
                measures = Measures.from_json(self.measures.data.get(skey))
                if not measures.fresh(msg.partition, msg.offset):
                    EVENTS.labels("redelivered").inc(len(rows))
                    continue
                measures.add(self.policy, msg.partition, msg.offset, rows)
                self.measures.data[skey] = measures.to_json()
                changed.add(skey)
            EVENTS.labels("measured").inc(len(columns[_ORG]))
            touched.add(org)
        await self._write([self._changelog(self.measures, k, self._org_partition(k.split("|")[1])) for k in changed])
        if touched:
            await self.evaluate(touched)

    # --- evaluation ---

    async def _limit(self, rule: Rule, subject: Subject) -> int | None:
        if not evaluate.needs_limit(rule):
            return None
        ident = (subject.org_id, subject.api_key_id)
        cached = self._limits.get(ident)
        if cached is None or time.monotonic() - cached[0] > LIMITS_TTL_S:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(org_key(subject.org_id), ORG_TIER_FIELD)
                if subject.api_key_id is not None:
                    pipe.hgetall(overrides_key(subject.org_id, subject.api_key_id))
                got = await pipe.execute()
            tier = got[0].decode() if got[0] else None
            overrides = parse_overrides(got[1]) if len(got) > 1 and got[1] else None
            cached = self._limits[ident] = (time.monotonic(), tier, overrides)
        return evaluate.limit_of(rule, subject, self.policy, cached[1], cached[2])

    async def _registered(self, org_id: str) -> dict[str, KeyRecord]:
        """The org's API keys as the registry's materializer keeps them in Redis."""
        cached = self._registry.get(org_id)
        if cached is None or time.monotonic() - cached[0] > KEYS_TTL_S:
            records = {}
            for key_id, raw in (await self.redis.hgetall(api_key_index(org_id))).items():
                try:
                    records[key_id.decode()] = KeyRecord.decode(raw)
                except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                    continue  # the materializer writes checked records only; never stop for one
            cached = self._registry[org_id] = (time.monotonic(), records)
        return cached[1]

    def _orgs(self) -> set[str]:
        """Every org with measures, with rules of its own (silence is news too: an unusual drop),
        or with an alert not inactive."""
        orgs = {k.split("|")[1] for k in self.measures.data}
        orgs.update(org for org, _ in self.sources.rules.records if org != GLOBAL)
        orgs.update(rec["org"] for rec in self.states.data.values()
                    if rec and "s" in rec and rec["s"]["status"] != "inactive")  # not the groups' records
        return orgs

    async def evaluate(self, orgs: set[str] | None = None, now_ms: int | None = None) -> None:
        async with self._eval_lock:
            await self._evaluate(self._orgs() if orgs is None else orgs,
                                 int(time.time() * 1000) if now_ms is None else now_ms)

    async def _evaluate(self, orgs: set[str], now_ms: int) -> None:
        records: list = []
        history: list[HistoryRecord] = []
        outboxes: set[str] = set()
        silences = list(self.sources.silences.values())
        by_org: dict[str, list] = {}  # the rules grouped once per evaluation, not sorted again per org
        for (rule_org, _), record in sorted(self.sources.rules.records.items()):
            by_org.setdefault(rule_org, []).append(record)
        for org in sorted(orgs):
            keys = sorted(self._keys.get(org, ()))
            for record in by_org.get(org, []) + by_org.get(GLOBAL, []):
                rule = record.rule
                registry: dict[str, KeyRecord] = {}
                if rule.type == "key_expiring":
                    try:
                        registry = await self._registered(org)
                    except (OSError, aioredis.RedisError) as exc:
                        log.warning("alert key registry unavailable", extra={"error": str(exc)[:200]})
                        continue
                for subject in evaluate.subjects(rule, org, sorted(registry) if rule.type == "key_expiring" else keys):
                    measures = self.measures.data.get(subject_key(subject.org_id, subject.api_key_id))
                    try:
                        limit = await self._limit(rule, subject)
                    except (OSError, aioredis.RedisError) as exc:  # Redis away: measure again next time
                        log.warning("alert limits unavailable", extra={"error": str(exc)[:200]})
                        continue
                    seasonal = None
                    if rule.type == "unusual_activity" and self.rollups is not None:
                        seasonal = self.rollups.hours(subject.org_id, subject.api_key_id, [
                            hour_like_now(now_ms, k * WEEK_MS) for k in range(1, rule.baseline_weeks + 1)])
                    if rule.type == "key_expiring":
                        value = evaluate.key_expiry(registry.get(subject.api_key_id or ""), now_ms)
                    else:
                        value = evaluate.value(rule, subject, Measures.from_json(measures) if measures else None,
                                               self.policy, now_ms, limit, seasonal)
                    fp = fingerprint(rule, subject)
                    rec = self.states.data.get(fp)
                    state = msgspec.convert(rec["s"], AlertState) if rec else None
                    result = step(rule, subject, value, now_ms, state, silences)
                    if not result.transitions and _same(result.state, state or AlertState()):
                        continue  # only the value moved: nothing to remember (the history has the values)
                    outbox = list(rec["out"]) if rec else []
                    group = grouping.group_key(rule.org_id, rule.rule_id, subject.org_id) if rule.group_wait else None
                    for t in result.transitions:
                        TRANSITIONS.labels(t.kind).inc()
                        history.append(_transition_record(rule, subject, t))
                        if t.notify and t.kind in NOTIFIED_KINDS:
                            started = state.fired_ms if (state and t.kind == "resolved") else None
                            n = notifications.for_transition(rule, subject, t, started)
                            item = {"n": msgspec.to_builtins(n), "ch": list(rule.channels)}
                            outbox.append(item if group is None else {**item, "g": group})
                            log.info("alert transition", extra={"fingerprint": fp, "kind": t.kind,
                                                                "notification_id": n.id, "org_id": org})
                    self.states.data[fp] = {"s": msgspec.to_builtins(result.state), "org": subject.org_id,
                                            "key": subject.api_key_id, "rule": [rule.org_id, rule.rule_id],
                                            "out": outbox}
                    records.append(self._changelog(self.states, fp, self._org_partition(subject.org_id)))
                    if outbox:
                        outboxes.add(fp)
        # The transitions and their notifications are on the broker before any is sent.
        records += [(ALERT_HISTORY_TOPIC, h.row_id.encode(), h.encode(), None) for h in history]
        await self._write(records)
        for fp in outboxes:
            self.kick(fp)
        if time.monotonic() > self._next_forget:
            self._next_forget = time.monotonic() + FORGET_EVERY_S
            await self._forget(now_ms)

    async def _forget(self, now_ms: int) -> None:
        gone = []
        for skey in list(self.measures.data):
            measures = Measures.from_json(self.measures.data[skey])
            if measures.forget(self.policy, now_ms):
                del self.measures.data[skey]
            else:
                self.measures.data[skey] = measures.to_json()
            gone.append(self._changelog(self.measures, skey, self._org_partition(skey.split("|")[1])))
        await self._write(gone)

    # --- delivery: the outbox of one alert, in order, one task per alert ---

    def deliver_outbox(self, fp: str) -> None:
        task = self._deliveries.get(fp)
        if task is None or task.done():
            self._deliveries[fp] = asyncio.create_task(self._deliver(fp), name=f"alert delivery {fp}")

    def kick(self, fp: str) -> None:
        """Send what an alert's outbox holds: on its own, or through its group when the first
        notification waiting is grouped."""
        rec = self.states.data.get(fp)
        if not rec or not rec.get("out"):
            return
        group = rec["out"][0].get("g")
        if group is None:
            self.deliver_outbox(fp)
            return
        self._members.setdefault(group, set()).add(fp)
        task = self._groups.get(group)
        if task is None or task.done():
            self._groups[group] = asyncio.create_task(self._group(group), name=f"alert group {group}")

    def recover_outboxes(self) -> None:
        """After a restart (or a rebalance): send what recorded transitions still owe."""
        pending = [key for key, rec in self.states.data.items() if rec and rec.get("out")]
        OUTBOX.set(sum(len(self.states.data[key]["out"]) for key in pending))
        task = self._deliveries.get("recovery")
        if task is None or task.done():
            self._deliveries["recovery"] = asyncio.create_task(self._recover(), name="alert outbox recovery")

    async def _recover(self) -> None:
        """What a flush took into its group but a crash left in the alerts' outboxes is
        struck (on the broker) before anything of the groups is sent; then every outbox goes."""
        try:
            claimed: dict[str, set[str]] = {}  # org -> ids taken by its groups' last flushes
            for key, rec in list(self.states.data.items()):
                if rec and grouping.is_group(key):
                    claimed.setdefault(rec["org"], set()).update(rec.get("m", ()))
            struck = []
            for fp, rec in list(self.states.data.items()):
                if rec and "s" in rec and rec.get("out") and claimed.get(rec["org"]):
                    after = grouping.strike(rec, claimed[rec["org"]])
                    if after is not None:
                        self.states.data[fp] = after
                        struck.append(self._changelog(self.states, fp, self._org_partition(rec["org"])))
            await self._write(struck)
            for key, rec in list(self.states.data.items()):
                if rec and rec.get("out"):
                    self.deliver_outbox(key) if grouping.is_group(key) else self.kick(key)
        except GaveUp:
            pass

    # --- grouping: one task per group, flushing it when due (alerts/grouping.py) ---

    async def _group(self, key: str) -> None:
        try:
            while True:
                group = self.states.data.get(key)
                members = self._members.get(key, set())
                found = grouping.heads(((fp, self.states.data.get(fp)) for fp in sorted(members)), key, group)
                if not found:
                    self._members.pop(key, None)  # nothing waits: its members are named again when one does
                    return
                _, rule_org, rule_id, org = key.split("|")
                record = self.sources.rules.records.get((rule_org, rule_id))
                wait_s, interval_s = (record.rule.group_wait, record.rule.group_interval_s) if record else (0, 0)
                due = grouping.due_ms(min(h.item["n"]["at_ms"] for h in found), (group or {}).get("last_ms"), wait_s,
                                      interval_s)
                delay_s = due / 1000 - time.time()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                    continue  # look again: more may have joined
                await self._flush(key, org, [rule_org, rule_id], group, found)
        except GaveUp:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: logged; the outboxes keep their notifications for the next restart
            log.exception("alert group flush failed unexpectedly", extra={"group": key})

    async def _flush(self, key: str, org: str, rule: list[str], group: dict | None, found: list) -> None:
        """The group's notification(s) into its outbox, struck from the alerts' outboxes, both
        on the broker (the group's record first, on the same partition) before any is sent."""
        done = grouping.flush(group, key, org, rule, found, int(time.time() * 1000))
        written = self._unwritten[key] = asyncio.Event()
        self.states.data[key] = done.group
        records = [self._changelog(self.states, key, self._org_partition(org))]
        for fp in sorted({h.fingerprint for h in found}):
            after = grouping.strike(self.states.data.get(fp) or {}, done.claimed)
            if after is not None:
                self.states.data[fp] = after
                records.append(self._changelog(self.states, fp, self._org_partition(org)))
        try:
            await self._write(records)
        finally:
            written.set()
            if self._unwritten.get(key) is written:
                del self._unwritten[key]
        for item in done.items:
            log.info("alert group notification", extra={"group": key, "notification_id": item["n"]["id"],
                                                        "kind": item["n"]["kind"], "alerts": len(item["n"]["alerts"])})
        self.deliver_outbox(key)
        for fp in sorted({h.fingerprint for h in found}):
            if self.states.data.get(fp, {}).get("out") and "g" not in self.states.data[fp]["out"][0]:
                self.kick(fp)  # an ungrouped notification behind (the rule's group wait was turned off)

    async def _deliver(self, fp: str) -> None:
        try:
            while True:
                rec = self.states.data.get(fp)
                if not rec or not rec.get("out"):
                    return
                written = self._unwritten.get(fp)
                if written is not None:  # a group's flush not on the broker yet: its id may change
                    await written.wait()
                    continue
                item = rec["out"][0]
                if "g" in item:  # grouped: the group's task takes it
                    self.kick(fp)
                    return
                notification = msgspec.convert(item["n"], Notification)
                if not item["ch"]:
                    await self._strike(fp, notification.id, None)
                    continue
                name = item["ch"][0]
                outcome = await self._deliver_one(notification, name)
                await self._strike(fp, notification.id, name, outcome)
        except GaveUp:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: logged; the outbox keeps it for the next restart
            log.exception("alert delivery failed unexpectedly", extra={"fingerprint": fp})

    async def _deliver_one(self, notification: Notification, name: str) -> Outcome | None:
        channel = self.settings.alert_channels.get(name)
        if channel is None:
            log.error("alert channel not configured; notification not sent on it",
                      extra={"channel": name, "notification_id": notification.id})
            await self._write(_delivery_records(notification, name, 0, "failed", "channel not configured"))
            return None
        attempts: list = []

        async def on_attempt(attempt: int, outcome: str, error: str | None) -> None:
            attempts.extend(_delivery_records(notification, name, attempt, outcome, error or ""))

        outcome = await deliver(notification, name, channel, self.settings, dead_letters=self.dead_letters,
                                on_attempt=on_attempt)
        if not outcome.delivered:
            attempts.extend(_delivery_records(notification, name, outcome.attempts, "dead_lettered",
                                              outcome.error or ""))
        await self._write(attempts)
        return outcome

    async def _strike(self, fp: str, notification_id: str, channel: str | None, outcome: Any = None) -> None:
        """The channel is done with (delivered, dead-lettered or not configured): off the outbox."""
        rec = self.states.data.get(fp)
        if not rec or not rec["out"] or rec["out"][0]["n"]["id"] != notification_id:
            return
        out = [dict(item) for item in rec["out"]]
        if channel is not None:
            out[0]["ch"] = [c for c in out[0]["ch"] if c != channel]
        if not out[0]["ch"]:
            out.pop(0)
        self.states.data[fp] = {**rec, "out": out}
        await self._write([self._changelog(self.states, fp, self._org_partition(rec["org"]))])


class _Current:
    """A table key's value as it is when its changelog record is sent: a record made
    earlier never overwrites a later change (both go out in order, each with the latest)."""

    __slots__ = ("table", "key")

    def __init__(self, table: faust.Table, key: str):
        self.table, self.key = table, key

    def value(self) -> bytes | None:
        value = self.table.data.get(self.key)
        return None if value is None else orjson.dumps(value)


def _same(a: AlertState, b: AlertState) -> bool:
    return msgspec.structs.replace(a, value=None) == msgspec.structs.replace(b, value=None)


def _transition_record(rule: Rule, subject: Subject, t: Transition) -> HistoryRecord:
    nid = t.notification_id or ""
    return HistoryRecord(record=TRANSITION, row_id=t.row_id, at_ms=t.at_ms, org_id=subject.org_id,
                         api_key_id=subject.api_key_id, fingerprint=t.fingerprint, rule_org_id=rule.org_id,
                         rule_id=rule.rule_id, rule_type=rule.type, severity=rule.severity, kind=t.kind,
                         episode=t.episode, from_status=t.from_status, to_status=t.to_status, value=t.value,
                         threshold=t.threshold, notification_id=nid, muted=t.muted)


def _delivery_records(n: Notification, channel: str, attempt: int, outcome: str, error: str) -> list[tuple]:
    """A delivery attempt's history rows: one per alert it was about (a grouped notification
    lists several), each under its own transition's notification id."""
    at_ms = int(time.time() * 1000)
    out = []
    for a in n.members:
        row_id = f"{n.id}/{channel}/{attempt}/{outcome}/{at_ms}"
        h = HistoryRecord(record=DELIVERY, row_id=row_id if a.id == n.id else f"{a.id}/{row_id}", at_ms=at_ms,
                          org_id=n.org_id, api_key_id=a.api_key_id, fingerprint=a.fingerprint,
                          rule_org_id=n.rule_org_id, rule_id=n.rule_id, rule_type=n.rule_type, severity=n.severity,
                          kind=n.kind, episode=a.episode, value=a.value, threshold=a.threshold, notification_id=a.id,
                          channel=channel, attempt=attempt, outcome=outcome, error=error[:500])
        out.append((ALERT_HISTORY_TOPIC, h.row_id.encode(), h.encode(), None))
    return out


def process_age_s() -> float | None:
    """Seconds since this process began (Linux /proc), for the start-up timings logged."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        return round(uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


def create_app(settings: Settings) -> faust.App:
    # Where a restart's seconds go (an alert crossing during it waits them all): the phases
    # of the start are logged with the process's age, from assignment to the first batch.
    first_batch, recovered = [True], []
    partitions = settings.events_partitions
    app = faust.App(
        ALERTS_APP_ID,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        store="memory://",
        datadir=str(settings.state_dir / "alerts-data"),  # Faust's own files, not the working directory
        topic_partitions=partitions,
        topic_replication_factor=settings.kafka_replication_factor,  # its tables: 3 replicas on 3 brokers
        web_enabled=False,
        # A new alerts stage reads the topic from the start, skipping records older than the
        # longest window without decoding them; its group's offsets then carry on.
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_interval=1.0,
        consumer_metadata_max_age_ms=5000,  # see processors/app.py
        # A stage killed without leaving the group holds its partitions until its session
        # times out, and every alert waits that long: the broker's minimum (6 s), heartbeats each second.
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        # Static membership: a restarted stage (same host) takes its partitions back at once,
        # without a rebalance waiting for the killed one's session to time out.
        consumer_group_instance_id=f"{ALERTS_APP_ID}-{socket.gethostname()}"[:200],
        broker_max_poll_records=2000,
        stream_buffer_maxsize=8000,
        TableManager=faust_start.PromptTableManager,  # no 1 s sleep before recovery (faust_start.py)
    )
    faust_start.prompt_transport(app)  # fetches wait 100 ms for data at most, not 1.5 s
    events_topic = app.topic(EVENTS_TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw",
                             value_serializer="raw", partitions=partitions)
    measures = _table(app, MEASURES_TABLE, partitions)
    states = _table(app, STATE_TABLE, partitions)
    running: dict[str, Stage] = {}

    @app.on_partitions_assigned.connect
    async def _assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
        log.info("alerts partitions assigned", extra={"process_age_s": process_age_s()})

    @app.on_rebalance_complete.connect
    async def _ready(sender: Any, **kwargs: Any) -> None:
        if not recovered:
            recovered.append(True)
            log.info("alerts ready: tables recovered", extra={"process_age_s": process_age_s()})
        READY.set(1)
        if "stage" in running:
            running["stage"].recover_outboxes()

    @app.timer(settings.alerts_eval_interval_s)
    async def _tick() -> None:
        stage = running.get("stage")
        if stage is not None and stage.sources.loaded.is_set():
            try:
                await stage.evaluate()
            except GaveUp:
                pass

    @app.agent(events_topic)
    async def evaluate_events(stream: faust.StreamT) -> None:
        stage = Stage(settings, measures, states, partitions)
        await stage.start()
        await stage.sources.loaded.wait()
        running["stage"] = stage
        stage.recover_outboxes()
        try:
            async for batch in stream.take_events(500, within=0.05):
                if first_batch:
                    first_batch.clear()
                    log.info("alerts first batch", extra={"process_age_s": process_age_s(), "events": len(batch)})
                await stage.handle(batch)
        except GaveUp:
            log.info("stopping: the batch in progress is left unacknowledged, to be read again")
        finally:
            running.clear()
            await stage.stop()

    return app


class Worker(faust.Worker):
    """Faust's worker, stopping within seconds when asked (as processors/app.py's)."""

    def _schedule_shutdown(self, signal: Any) -> None:
        _stopping.set()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.app.conf.stream_wait_empty = False
        super()._schedule_shutdown(signal)
