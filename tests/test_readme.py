"""README's commands, run on the session's stack so that README cannot go stale: its first
command (`make demo`, as `quotaflow demo`), and every command of a ```sh block that talks
to a running stack (uses kcat, redis-cli, curl or quotaflow), with the documented default
ports rewritten to the test stack's.

The stack is in the state README runs them in: the demo has run ("While it runs"), the
processor and the sink run, and the API has the tokens README configures (TOKEN for
acme, OPSTOKEN for every org). Each command must exit 0 and show what it is
there to show: the topics, a decision's fields, dead letters with their reason, an
event published, an answer of the query API."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from markdown_it import MarkdownIt

from quotaflow.core.settings import Settings
from quotaflow.deploy.demo_traffic import DEMO_ORGS, INVALID_EVERY
from quotaflow.deploy.observe import end_offsets
from quotaflow.deploy.system_packages import ensure_command
from quotaflow.schemas.api_keys import SCAN_PATTERN
from quotaflow.schemas.events import decode
from quotaflow.schemas.redis_keys import Decision
from quotaflow.schemas.topics import EVENTS_TOPIC
from tests.pipeline import Pipeline

pytestmark = pytest.mark.stack
README = Path(__file__).resolve().parent.parent / "README.md"
TOOLS = ("kcat", "redis-cli", "curl", "quotaflow")
_USES = re.compile(r"(?:^|[|;&(]\s*)(" + "|".join(map(re.escape, TOOLS)) + r")\b")
API_TOKENS = {"TOKEN": "acme", "OPSTOKEN": "*"}  # as README configures them
# README's `export QUOTAFLOW_KEY_HASH_SECRETS=...` (a random secret), in every example's environment
KEY_HASH_SECRETS = orjson.dumps({"k1": "readme-example-secret-0123456789abcdef"}).decode()


@dataclass(frozen=True)
class Example:
    line: int  # in README.md, 1-based
    command: str  # one command, continuation lines joined
    tool: str

    def __str__(self) -> str:  # the test's id
        return f"line{self.line}-{self.tool}"


def examples(text: str) -> list[Example]:
    """The commands of the ```sh blocks that use one of TOOLS, one per logical line."""
    out = []
    for token in MarkdownIt().parse(text):
        if token.type != "fence" or token.info.strip() not in ("sh", "bash", "shell"):
            continue
        first = token.map[0] + 2  # the fence's first content line, 1-based
        pending, start = "", first
        for n, line in enumerate(token.content.splitlines(), first):
            if not pending:
                start = n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command, pending = pending + line, ""
            if (m := _USES.search(command.split(" #")[0])) is not None:
                out.append(Example(start, command.strip(), m.group(1)))
    return out


def default_ports() -> dict[int, str]:
    """README's ports (the settings' defaults) -> the setting they belong to."""
    return {field.default: name for name, field in Settings.model_fields.items()
            if name.endswith("_port") and isinstance(field.default, int)}


def on_test_stack(command: str, settings: Settings) -> str:
    """The command with every documented default port replaced by the test stack's."""
    for port, name in default_ports().items():
        command = re.sub(rf"(?<![0-9]){port}(?![0-9])", str(getattr(settings, name)), command)
    return command


EXAMPLES = examples(README.read_text())


def test_the_readme_has_examples_for_each_client_it_names():
    """The extraction finds what is there (a change to the fences must not make the
    test below quietly run nothing)."""
    assert {e.tool for e in EXAMPLES} >= {"kcat", "redis-cli", "curl"}, EXAMPLES
    ports = set(default_ports())
    assert {19092, 16379, 19120} <= ports


DEMO_SECONDS = 25  # even split across a minute boundary, the FREE key at 60/min exceeds 10/min in one window


@pytest.fixture(scope="module")
def demo_run(live_stack) -> subprocess.CompletedProcess:
    """`quotaflow demo` on the session's stack, once: its output is checked below, and the
    state it leaves (decisions in Redis, dead letters) is what README's "While it runs"
    examples look at."""
    return subprocess.run([sys.executable, "-m", "quotaflow", "demo", "--seconds", str(DEMO_SECONDS)],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())


def test_demo_runs_end_to_end_and_accounts_for_every_event(demo_run):
    result = demo_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout[-3000:]  # shown with any failure below
    live = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(live) >= 10, output  # a live summary every 2 s
    final = result.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"demo: produced=(\d+) processed=(\d+) stored=(\d+) denied_keys=(\d+) dead_letters=(\d+) lost=(\d+)",
                     final)
    assert m, output
    produced, processed, stored, denied, dead, lost = map(int, m.groups())
    assert produced > 300, output
    assert processed == produced and stored == produced and lost == 0, output
    assert dead == produced // INVALID_EVERY, output
    assert denied >= 1, output
    keys = [line for line in result.stdout.splitlines() if line.startswith("keys: ")]
    assert len(keys) == 1, output
    m = re.match(r"keys: created=(\d+) verified=(\d+) \(admitted=\d+\) wrong_scope=(\w+) mistyped=(\w+) "
                 r"revoked_refused_after_ms=(\d+) ", keys[0])
    assert m, output
    assert m.group(1) == m.group(2) == str(len(DEMO_ORGS)), output
    assert m.group(3, 4) == ("insufficient_scope", "malformed_key"), output
    assert int(m.group(5)) <= 1000, output  # the bound for a revocation to reach gateways


@pytest.fixture(scope="module")
def documented_stack(live_stack, demo_run):
    """The stack as README's examples expect it: the demo ran, the processor and the sink
    run, and the API has README's tokens."""
    for cmd, package in (("kcat", "kcat"), ("redis-cli", "redis-tools"), ("curl", "curl")):
        ensure_command(cmd, package)
    pipeline = Pipeline(live_stack)
    try:
        pipeline.start("processor")
        pipeline.start("sink", QUOTAFLOW_API_TOKENS=orjson.dumps(API_TOKENS).decode())
        yield live_stack
    finally:
        pipeline.stop_all()


def run(example: Example, settings: Settings, cwd: Path) -> subprocess.CompletedProcess:
    command = on_test_stack(example.command, settings)
    # `quotaflow` as installed beside this Python (the venv need not be on PATH)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # errors="replace": the dead-letter example prints refused payloads as they came, any bytes
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, capture_output=True, text=True,
                          errors="replace", timeout=120, env={**env, "QUOTAFLOW_KEY_HASH_SECRETS": KEY_HASH_SECRETS})


def written_file(command: str, cwd: Path) -> str | None:
    """What a command redirected into a file (`... > endpoints.csv`) wrote there."""
    m = re.search(r">\s*(\S+)\s*$", command.split(" #")[0])
    return (cwd / m.group(1)).read_text() if m else None


async def _published_since(settings: Settings, before: dict[int, int]) -> list:
    """The records put on the events topic after ``before`` (its end offsets then)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    ends = await end_offsets(settings.kafka_bootstrap, EVENTS_TOPIC)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(EVENTS_TOPIC, p) for p, end in ends.items() if end > before.get(p, 0)]
        if not tps:
            return []
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, before.get(tp.partition, 0))
        out: list = []
        while any([await consumer.position(tp) < ends[tp.partition] for tp in tps]):
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                out.extend(r for r in records if r.offset < ends[r.partition])
        return out
    finally:
        await consumer.stop()


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_each_shell_example_runs_against_the_stack_and_shows_what_it_says(example, documented_stack, tmp_path):
    settings = documented_stack
    publishes = example.tool == "kcat" and " -P" in example.command
    before = asyncio.run(end_offsets(settings.kafka_bootstrap, EVENTS_TOPIC)) if publishes else {}
    done = run(example, settings, tmp_path)
    shown = f"README.md line {example.line}: {example.command}\nexit {done.returncode}\nstdout: {done.stdout[-2000:]}\n" \
            f"stderr: {done.stderr[-2000:]}"
    assert done.returncode == 0, shown
    out = written_file(example.command, tmp_path)
    out = done.stdout if out is None else out
    if publishes:  # kcat -P: prints nothing; the event it published is on the topic, valid
        (record,) = asyncio.run(_published_since(settings, before))
        event = decode(record.value)  # raises, naming the field, if the example's event is not valid
        assert record.key == event.org_id.encode(), shown
        return
    assert out.strip(), f"printed nothing\n{shown}"
    if example.tool == "quotaflow" and " keys create " in example.command:  # the key, printed once
        assert re.search(SCAN_PATTERN, out) and "only time the key is shown" in done.stderr, shown
    if example.tool == "redis-cli":
        assert not out.startswith(("(error)", "ERR", "WRONGTYPE")), shown
        if " HGETALL " in f" {example.command} ":
            lines = out.strip().splitlines()
            fields = dict(zip(lines[0::2], lines[1::2]))
            assert len(lines) % 2 == 0 and Decision.from_redis(fields) is not None, f"not a decision's fields\n{shown}"
    elif example.tool == "kcat" and " -L" in example.command:
        assert f'topic "{EVENTS_TOPIC}"' in out, shown
    elif example.tool == "kcat" and " -C" in example.command and "deadletter" in example.command:
        assert "qf.error.reason=" in out, f"no dead letter with its reason\n{shown}"
    elif example.tool == "curl" and "/v1/" in example.command:
        if ".csv" in example.command:
            header, *_ = list(csv.reader(io.StringIO(out)))
            assert header and not out.lstrip().startswith("{"), shown
        else:
            answer = orjson.loads(out)
            assert "error" not in answer and "rows" in answer and "source" in answer, shown
