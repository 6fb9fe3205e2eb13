"""Configuration checked when it loads: windows and tier limits typed and checked together
(as the environment gives them), errors in one line naming the variable, never its value;
the effective configuration shown with every secret hidden. Pure logic: no server."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from quotaflow.core.redact import MASK
from quotaflow.core.settings import (
    DEFAULT_TIER,
    DEFAULT_TIER_LIMITS,
    DEFAULT_WINDOWS_S,
    LimitSettings,
    Settings,
    describe_error,
    effective,
)
from quotaflow.schemas import tiers
from quotaflow.schemas.limits import Policy, Window, policy_from_settings

SECRET = "S3NTINEL-value-9f1c"  # stands for any value: never in a message


def error_of(**given) -> str:
    with pytest.raises(ValidationError) as failed:
        Settings(**given)
    line = describe_error(failed.value)
    assert "\n" not in line
    return line


def test_the_default_limits_name_the_tiers_of_the_schema():
    assert set(DEFAULT_TIER_LIMITS) == {t.value for t in tiers.Tier}
    assert DEFAULT_TIER == tiers.DEFAULT_TIER.value
    assert all(len(limits) == len(DEFAULT_WINDOWS_S) for limits in DEFAULT_TIER_LIMITS.values())
    policy = policy_from_settings(Settings())
    assert policy.windows == tuple(Window(s) for s in DEFAULT_WINDOWS_S)
    assert policy.tiers == DEFAULT_TIER_LIMITS and policy.default_tier == DEFAULT_TIER


def test_the_environment_formats_users_set_today(monkeypatch):
    monkeypatch.setenv("QUOTAFLOW_WINDOWS", " 1, 60 ,3600")
    monkeypatch.setenv("QUOTAFLOW_SLIDING_WINDOWS", "true")
    monkeypatch.setenv("QUOTAFLOW_TIER_LIMITS", '{"FREE": [2, 10, null], "GOLD_2": [5, 50, 500]}')
    monkeypatch.setenv("QUOTAFLOW_LATE_GRACE_S", "5")
    limits = Settings().limits
    assert limits == LimitSettings(windows_s=(1, 60, 3600), sliding=True,
                                   tier_limits={"FREE": (2, 10, None), "GOLD_2": (5, 50, 500)},
                                   default_tier="FREE", late_grace_s=5.0, reservation_ttl_s=120.0)
    policy = policy_from_settings(Settings())
    assert policy == Policy(windows=(Window(1, True), Window(60, True), Window(3600, True)),
                            tiers={"FREE": (2, 10, None), "GOLD_2": (5, 50, 500)}, late_grace_ms=5_000)
    monkeypatch.setenv("QUOTAFLOW_TIER_LIMITS", "")  # set but empty: the defaults, as before
    assert Settings().limits.tier_limits == DEFAULT_TIER_LIMITS


def test_the_example_of_the_issue_is_refused_when_the_settings_load(monkeypatch):
    monkeypatch.setenv("QUOTAFLOW_TIER_LIMITS", '{"FREE":[1,2]}')
    with pytest.raises(ValidationError) as failed:
        Settings()
    assert describe_error(failed.value) == ("QUOTAFLOW_TIER_LIMITS (tier_limits): tier FREE has 2 limits for the "
                                            "3 windows of QUOTAFLOW_WINDOWS")


@pytest.mark.parametrize("given, starts, says", [
    ({"windows": f"60,{SECRET}"}, "QUOTAFLOW_WINDOWS (windows): ", "window #2 is not a whole number of seconds"),
    ({"windows": ""}, "QUOTAFLOW_WINDOWS (windows): ", "no window given"),
    ({"windows": "60,60,3600"}, "QUOTAFLOW_WINDOWS (windows): ", "must differ"),
    ({"windows": "0,60,3600"}, "QUOTAFLOW_WINDOWS (windows) at #1: ", "greater than or equal to 1"),
    ({"windows": "60,3600,99999999"}, "QUOTAFLOW_WINDOWS (windows) at #3: ", "less than or equal to"),
    ({"windows": "1,60"}, "QUOTAFLOW_WINDOWS (windows) has 2 windows", "set QUOTAFLOW_TIER_LIMITS too"),
    ({"tier_limits": "{" + SECRET}, "QUOTAFLOW_TIER_LIMITS (tier_limits): ", "not JSON"),
    ({"tier_limits": json.dumps([SECRET])}, "QUOTAFLOW_TIER_LIMITS (tier_limits): ", "valid dictionary"),
    ({"tier_limits": json.dumps({"FREE": [1, 2, SECRET]})}, "QUOTAFLOW_TIER_LIMITS (tier_limits) at FREE/#3: ",
     "valid integer"),
    ({"tier_limits": json.dumps({"FREE": [1, 2, -1]})}, "QUOTAFLOW_TIER_LIMITS (tier_limits) at FREE/#3: ",
     "greater than or equal to 0"),
    ({"tier_limits": json.dumps({"FREE": [1, 2, 2.5]})}, "QUOTAFLOW_TIER_LIMITS (tier_limits) at FREE/#3: ",
     "valid integer"),
    ({"tier_limits": json.dumps({"FREE": [1, 2, 3], "gold": [1, 2, 3]})}, "QUOTAFLOW_TIER_LIMITS (tier_limits): ",
     "tier #2: a tier name is"),
    ({"tier_limits": json.dumps({"GOLD": [1, 2, 3]})}, "QUOTAFLOW_TIER_LIMITS (tier_limits): ",
     "no limits for FREE"),
    ({"windows": "60,3600", "tier_limits": json.dumps({"FREE": [1, 2], "GOLD": [1, 2, 3]})},
     "QUOTAFLOW_TIER_LIMITS (tier_limits): ", "tier GOLD has 3 limits for the 2 windows of QUOTAFLOW_WINDOWS"),
    ({"kafka_port": 70000}, "QUOTAFLOW_KAFKA_PORT (kafka_port): ", "less than or equal to 65535"),
    ({"api_port": -1}, "QUOTAFLOW_API_PORT (api_port): ", "greater than or equal to 0"),
    ({"kafka_bootstrap": f"{SECRET}"}, "QUOTAFLOW_KAFKA_BOOTSTRAP (kafka_bootstrap): ", "address #1 is not host:port"),
    ({"kafka_bootstrap": "a:1,b:99999"}, "QUOTAFLOW_KAFKA_BOOTSTRAP (kafka_bootstrap): ", "address #2"),
    ({"log_level": SECRET}, "QUOTAFLOW_LOG_LEVEL (log_level): ", "'DEBUG', 'INFO'"),
    ({"kafka_heap": SECRET}, "QUOTAFLOW_KAFKA_HEAP (kafka_heap): ", "should match pattern"),
    ({"kafka_controller_port": 1234, "redis_port": 1234},
     "QUOTAFLOW_KAFKA_PORT, QUOTAFLOW_KAFKA_CONTROLLER_PORT and QUOTAFLOW_REDIS_PORT", "must differ"),
    ({"api_tokens": {SECRET: 5}}, "QUOTAFLOW_API_TOKENS (api_tokens): ", "valid string"),  # no place in the dict
    ({"collector_batch_ms": 0}, "QUOTAFLOW_COLLECTOR_BATCH_MS (collector_batch_ms): ", "greater than or equal to 1"),
    ({"collector_batch_events": 10_001}, "QUOTAFLOW_COLLECTOR_BATCH_EVENTS (collector_batch_events): ",
     "less than or equal to 10000"),
    ({"ingest_key_scope": "Events Write"}, "QUOTAFLOW_INGEST_KEY_SCOPE (ingest_key_scope): ", "should match pattern"),
])
def test_a_bad_setting_is_named_with_the_problem_and_its_value_never_shown(given, starts, says):
    line = error_of(**given)
    assert line.startswith(starts) and says in line, line
    assert SECRET not in line


def test_a_log_level_is_taken_in_any_case():
    assert Settings(log_level="debug").log_level == "DEBUG"


# What the environment can hold: any text, lists of numbers, JSON of any shape; mostly
# near a valid configuration (a limit per window, FREE among the tiers), so that both
# outcomes are common.
_limit = st.one_of(st.none(), st.integers(-3, 2**60), st.integers(0, 10**6), st.floats(allow_nan=False),
                   st.booleans(), st.text(max_size=3))
_tier_name = st.one_of(st.just("FREE"), st.sampled_from(["GOLD", "free", "X1_", "9X"]), st.text(max_size=5))


@st.composite
def _configurations(draw) -> tuple[str, str]:
    lengths = draw(st.one_of(st.lists(st.integers(1, 100_000), unique=True, min_size=1, max_size=5),
                             st.lists(st.integers(-2, 40_000_000), max_size=5)))
    windows = draw(st.one_of(st.just(",".join(map(str, lengths))), st.text(max_size=20)))
    n = draw(st.one_of(st.just(len(lengths)), st.integers(0, 5)))
    limits = st.lists(st.one_of(st.integers(0, 10**6), st.none(), _limit), min_size=n, max_size=n)
    tier_map = st.dictionaries(_tier_name, limits, max_size=4).map(
        lambda d: {"FREE": [None] * n, **d} if draw(st.booleans()) else d)
    tier_limits = draw(st.one_of(tier_map.map(json.dumps), st.just(""), st.text(max_size=20)))
    return windows, tier_limits


@st.composite
def _valid_configurations(draw) -> tuple[str, str]:
    lengths = draw(st.lists(st.integers(1, 366 * 86400), unique=True, min_size=1, max_size=6))
    limits = st.lists(st.one_of(st.none(), st.integers(0, 2**53 - 1)), min_size=len(lengths), max_size=len(lengths))
    tiers = draw(st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,31}", fullmatch=True), limits, max_size=4))
    tiers["FREE"] = draw(limits)
    return ", ".join(map(str, lengths)), json.dumps(tiers)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_configurations(), _valid_configurations()))
def test_any_windows_and_tier_limits_load_into_a_policy_or_are_refused_by_name(configuration):
    """Whatever the two variables hold: either the settings load and the policy builds from
    them exactly as written, or the settings refuse them in one line naming a variable."""
    windows, tier_limits = configuration
    try:
        s = Settings(windows=windows, tier_limits=tier_limits)
    except ValidationError as exc:
        line = describe_error(exc)
        assert "\n" not in line and line.startswith(("QUOTAFLOW_WINDOWS", "QUOTAFLOW_TIER_LIMITS")), line
        event(line.split(":")[0])
        return
    event("loaded")
    policy = policy_from_settings(s)  # never raises once the settings loaded
    assert [w.length_s for w in policy.windows] == [int(x) for x in windows.split(",")]
    want = orjson.loads(tier_limits) if tier_limits.strip() else DEFAULT_TIER_LIMITS
    assert policy.tiers == {name: tuple(limits) for name, limits in want.items()}
    assert all(len(limits) == len(policy.windows) for limits in policy.tiers.values())


def test_the_effective_configuration_hides_every_secret():
    short, long_token = "abc", "ops-token-0123456789"
    s = Settings(api_tokens={short: "acme", long_token: "*"}, redis_url=f"redis://:{SECRET}@10.0.0.1:6379/0",
                 clickhouse_url=f"https://user:{SECRET}@ch.example:8443/db?password={SECRET}", windows="1,60,3600")
    shown = {variable: (value, is_set) for variable, value, is_set in effective(s)}
    text = repr(shown)
    assert SECRET not in text and long_token not in text and f'"{short}"' not in text
    assert shown["QUOTAFLOW_API_TOKENS"] == (f'{{"{MASK}":"acme","{MASK}":"*"}}', True)
    assert shown["QUOTAFLOW_REDIS_URL"] == (f"redis://:{MASK}@10.0.0.1:6379/0", True)
    assert shown["QUOTAFLOW_CLICKHOUSE_URL"] == (f"https://user:{MASK}@ch.example:8443/db?password={MASK}", True)
    assert shown["QUOTAFLOW_WINDOWS"] == ("1,60,3600", True)
    assert shown["QUOTAFLOW_SLIDING_WINDOWS"] == ("false", False)
    assert json.loads(shown["QUOTAFLOW_TIER_LIMITS"][0]) == {k: list(v) for k, v in DEFAULT_TIER_LIMITS.items()}
    assert set(shown) == {f"QUOTAFLOW_{name.upper()}" for name in Settings.model_fields}


@pytest.mark.parametrize("heap", ["768m", "2g", "2G", "805306368", "1048576k"])
def test_the_broker_heap_is_taken_as_java_takes_it(heap):
    assert Settings(kafka_heap=heap).kafka_heap == heap


def test_the_emitter_batches_as_configured(monkeypatch):
    from quotaflow.collector.emitter import Emitter

    monkeypatch.setenv("QUOTAFLOW_COLLECTOR_BATCH_MS", "20")
    monkeypatch.setenv("QUOTAFLOW_COLLECTOR_BATCH_EVENTS", "1")
    emitter = Emitter.from_settings(Settings())
    assert (emitter.batch_s, emitter.batch_events) == (0.02, 1)
