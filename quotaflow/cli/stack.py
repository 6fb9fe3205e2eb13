"""``quotaflow stack`` (the local Kafka, Redis and ClickHouse, and the stages it runs) and
``quotaflow supervise`` (how it runs them)."""

from __future__ import annotations

import argparse
import http.client
import os
import sys

from quotaflow.cli.registry import Command
from quotaflow.core.settings import Settings


def run_stack(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.deploy import stack

    if args.stages and args.action != "start":
        print(f"quotaflow: stack {args.action} takes no stage names", file=sys.stderr)
        return 2
    if unknown := [name for name in args.stages if name not in stack.PIPELINE]:
        print(f"quotaflow: unknown stage {unknown[0]!r}; stages: {', '.join(stack.PIPELINE)}", file=sys.stderr)
        return 2
    if args.brokers is not None or args.redis_cluster:
        if args.action not in ("up", "start"):
            flag, what = ("--brokers", "brokers") if args.brokers is not None else ("--redis-cluster", "Redis nodes")
            print(f"quotaflow: {flag} is for 'stack up' and 'stack start'; 'stack {args.action}' finds the "
                  f"{what} that run", file=sys.stderr)
            return 2
        settings = with_servers(args.brokers, args.redis_cluster)
    status = 0
    if args.action == "up":
        started = stack.up(settings)
        print(f"stack up ({', '.join(started) or 'already running'}; state in {settings.state_dir})")
    elif args.action == "start":
        stack.up(settings)  # what the stages need, if it is not running yet
        for name in args.stages or stack.PIPELINE:
            if stack.pipeline_proc(settings, name).pid() is not None:
                print(f"{name} already running")
            elif started_by_hand(settings, name):
                # A second one could not serve its metrics (the port is taken) and would exit at start.
                print(f"quotaflow: a {name} started by hand is running (metrics on 127.0.0.1:"
                      f"{stack.metrics_port(settings, name)}); stop it before 'stack start {name}'", file=sys.stderr)
                status = 1
            else:
                pid = stack.start_pipeline_process(settings, name)
                print(f"{name} started (pid {pid}, supervised); log in {stack.pipeline_log(settings, name)}")
    elif args.action == "down":
        stopped = stack.down(settings)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    if args.brokers is not None and args.brokers > 1 and args.action in ("up", "start"):
        print(f"Kafka: {args.brokers} brokers, bootstrap {settings.kafka_bootstrap}; other quotaflow commands "
              f"use them all with QUOTAFLOW_KAFKA_BROKERS={args.brokers} set")
    if args.redis_cluster and args.action in ("up", "start"):
        print(f"Redis: a cluster of 3 masters and 3 replicas at {settings.redis_url} (and the next 5 ports); other "
              f"quotaflow commands use it with QUOTAFLOW_REDIS_CLUSTER=true set")
    if args.action in ("up", "start", "status"):
        for name, running, where in stack.status(settings):
            if not running and name in stack.PIPELINE and started_by_hand(settings, name):
                running, where = True, (f"started by hand (not supervised: not restarted, not stopped by "
                                        f"'stack down'), metrics on 127.0.0.1:{stack.metrics_port(settings, name)}")
            print(f"  {name:<11} {'running' if running else 'stopped':<8} {where}")
    return status


def with_servers(brokers: int | None, redis_cluster: bool) -> Settings:
    """The settings with QUOTAFLOW_KAFKA_BROKERS=brokers (if given) and
    QUOTAFLOW_REDIS_CLUSTER=true (if asked), checked as at start; set in the environment
    too, so the stages 'stack start' runs use every broker and the cluster."""
    from quotaflow.core.settings import ConfigError, describe_error, get_settings

    if brokers is not None:
        os.environ["QUOTAFLOW_KAFKA_BROKERS"] = str(brokers)
    if redis_cluster:
        os.environ["QUOTAFLOW_REDIS_CLUSTER"] = "true"
    get_settings.cache_clear()
    try:
        return get_settings()
    except Exception as exc:
        raise ConfigError(describe_error(exc)) from None


def started_by_hand(settings: Settings, name: str) -> bool:
    """A ``quotaflow processor`` or ``quotaflow sink`` run in a terminal rather than by the
    stack: no supervisor knows of it, but it serves its metrics on the configured port
    (found there by its own gauge, so another program on the port is not taken for it).
    One run with its metrics port set to 0 cannot be seen."""
    from quotaflow.core import metrics
    from quotaflow.deploy import stack

    port = stack.metrics_port(settings, name)
    if not port or stack.pipeline_proc(settings, name).pid() is not None:
        return False
    try:
        return f"quotaflow_{name}_ready" in metrics.scrape(port, timeout_s=1.0)
    except (OSError, ValueError, http.client.HTTPException):  # URLError is an OSError
        return False


def run_supervise(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.deploy import stack, supervise
    from quotaflow.deploy.procs import running_as

    state_file = stack.pipeline_proc(settings, args.stage).state_file
    other = supervise.State.read(state_file)
    if other and other.supervisor_pid != os.getpid() and running_as(other.supervisor_pid, f"supervise {args.stage}"):
        print(f"quotaflow: a supervisor of the {args.stage} already runs (pid {other.supervisor_pid})", file=sys.stderr)
        return 1
    backoff = supervise.Backoff(settings.supervise_backoff_initial_s, settings.supervise_backoff_max_s,
                                settings.supervise_healthy_s)
    return supervise.run(args.stage, [sys.executable, "-m", "quotaflow", *stack.STAGE_ARGV[args.stage]], state_file,
                         backoff, standby_after_s=stack.STANDBY_AFTER_S.get(args.stage))


def _stack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "start", "down", "status"])
    p.add_argument("stages", nargs="*", metavar="STAGE", help="with 'start': processor, sink, alerts (default: all)")
    p.add_argument("--brokers", type=int, metavar="N",
                   help="with 'up' or 'start': run N Kafka brokers (as QUOTAFLOW_KAFKA_BROKERS=N; 3 gives quotaflow's "
                        "topics 3 replicas and min.insync.replicas=2); set the variable for the other commands too")
    p.add_argument("--redis-cluster", action="store_true",
                   help="with 'up' or 'start': run a Redis Cluster of 3 masters and 3 replicas instead of one "
                        "redis-server (as QUOTAFLOW_REDIS_CLUSTER=true); set the variable for the other commands too")


def _supervise_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=["processor", "sink", "alerts"])


COMMANDS = (
    Command("stack", "start, stop or inspect the local Kafka, Redis and ClickHouse", run_stack,
            description="The local stack on 127.0.0.1, state under QUOTAFLOW_STATE_DIR (default .quotaflow). "
                        "'up' installs what is missing (Kafka jars, redis-server) and starts what is not running. "
                        "'start' also runs the processor and the sink (or the stages named) in the background, "
                        "each under a supervisor that restarts it with backoff if it exits; logs in "
                        "QUOTAFLOW_STATE_DIR/logs. 'status' shows each stage's pid, uptime, restarts and "
                        "last exit, and a stage started by hand ('quotaflow processor') as such. "
                        "'down' stops everything the stack started.",
            arguments=_stack_arguments),
    Command("supervise", "run a stage and restart it with backoff whenever it exits unasked", run_supervise,
            description="Runs 'quotaflow STAGE' as a child process and restarts it with exponential backoff "
                        "and jitter (QUOTAFLOW_SUPERVISE_*) when it exits, logging each exit; SIGTERM "
                        "stops the stage (SIGKILL after 20 s) and the supervisor. 'stack start' and the "
                        "demo run stages this way.",
            arguments=_supervise_arguments),
)
