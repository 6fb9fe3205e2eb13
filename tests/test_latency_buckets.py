"""Latency buckets (schemas/clickhouse/latency.py): the stated error bound of every latency
quantile the rollups give, checked against exact quantiles of the raw latencies, in the
embedded engine; the views and the migration compute the buckets as the module does.
(Rows stored with t-digest states before migration 0007: tests/test_clickhouse_storage.py.)"""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotaflow.schemas.clickhouse import latency
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.migrate import available, migrate
from quotaflow.schemas.clickhouse.tables import RAW
from quotaflow.schemas.event_fields import LATENCY_MAX_MS
from tests.storage import check_latencies, float32, insert_latencies, latency_answers, latency_bounds

LEVELS = (0.5, 0.95, 0.99)
latencies_ms = st.floats(min_value=0, max_value=LATENCY_MAX_MS, allow_nan=False)


@given(latencies_ms)
def test_a_bucket_holds_its_latencies_and_its_representative_is_within_the_bound(x):
    x = float32(x)
    b = latency.bucket(x)
    lo, hi = latency.bounds_ms(b)
    assert 0 <= b <= latency.MAX_BUCKET
    assert lo <= x * (1 + 1e-12) and (x < hi * (1 + 1e-12) or b == latency.MAX_BUCKET)
    rep = latency.representative_ms(b)
    assert abs(rep - x) <= max(latency.RELATIVE_ERROR * x, latency.ABSOLUTE_ERROR_MS) * (1 + 1e-9)


def test_the_stated_bound_is_what_the_buckets_give():
    assert latency.RELATIVE_ERROR == pytest.approx(0.0219, abs=1e-4)  # "2.2 %" in the docs and the migration
    assert latency.bucket(LATENCY_MAX_MS) == latency.MAX_BUCKET
    assert latency.bucket(0.0) == latency.bucket(0.0999) == 0 and latency.bucket(0.1) == 1


@pytest.fixture(scope="module")
def ch(tmp_path_factory):
    client = connect(f"chdb://{tmp_path_factory.mktemp('latency') / 'clickhouse'}")
    migrate(client)
    yield client
    client.close()


def test_the_migration_computes_the_modules_buckets():
    # The views and the conversion write BUCKET_SQL out; that they compute the same buckets
    # as the module is what the answers below check (rollups against the raw table).
    sql = dict((name, text) for _, name, text in available())["latency_buckets"]
    assert sql.count(latency.BUCKET_SQL) == 6  # each view
    assert sql.count("toUInt16(least(1 + floor(log2(reinterpretAsFloat32(") == 6  # each conversion


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(latencies_ms | st.sampled_from([0.0, 0.1, 1.0, 1e3, LATENCY_MAX_MS]), min_size=1, max_size=200))
def test_the_sql_buckets_are_the_python_ones(ch, xs):
    got = ch.query(f"SELECT {latency.BUCKET_SQL} FROM (SELECT arrayJoin({{xs:Array(Float32)}}) AS latency_ms)",
                   parameters={"xs": xs}).result_rows
    assert [b for (b,) in got] == [latency.bucket(float32(x)) for x in xs]


_orgs = iter(range(10**9))


def _lognormal(rnd: random.Random, mu: float, sigma: float, n: int) -> list[float]:
    return [min(rnd.lognormvariate(mu, sigma), LATENCY_MAX_MS) for _ in range(n)]


# Latencies as services have them: most fast, a slow tail, ties, sub-0.1 ms, huge outliers.
distributions = st.one_of(
    st.lists(latencies_ms, min_size=1, max_size=300),
    st.builds(lambda mu, sigma, n, seed: _lognormal(random.Random(seed), mu, sigma, n),
              st.floats(-2, 9), st.floats(0.1, 2.5), st.integers(1, 400), st.integers(0, 2**32)),
    st.lists(st.sampled_from([0.0, 0.05, 3.0, 3.0, 250.0, 30_000.0]), min_size=1, max_size=100),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(distributions, st.integers(0, 2**32))
def test_every_table_answers_the_same_quantiles_within_the_bound_of_the_exact_ones(ch, latencies, seed):
    org = f"o{next(_orgs)}"
    insert_latencies(ch, org, latencies, int(time.time() * 1000), 3 * 86_400_000, seed)
    answers = latency_answers(ch, org)
    assert all(a == answers[RAW] for a in answers.values()), answers  # the same bucket counts, merged or not
    check_latencies(answers, latencies)


def test_a_seeded_heavy_tailed_day_at_scale(ch):
    # 60,000 requests, log-normal with a 1 % tail a hundred times slower.
    rnd = random.Random(16)
    latencies = [rnd.lognormvariate(3.0, 1.0) * (100 if rnd.random() < 0.01 else 1) for _ in range(60_000)]
    insert_latencies(ch, "seeded", latencies, int(time.time() * 1000), 86_400_000, 16)
    answers = latency_answers(ch, "seeded")
    check_latencies(answers, latencies)
    # The check can fail: the p95 is not within the bound of the p99.
    lo, hi = latency_bounds(latencies, 0.99)
    assert not lo <= answers[RAW][1] <= hi


def test_the_readme_shows_the_expression_the_query_api_uses():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"`{latency.quantiles_sql(raw=False)}`" in readme.replace("\n", " ")
