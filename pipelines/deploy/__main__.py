"""``python -m pipelines.deploy up|down|status|worker|sweep``: the cluster profile from the command line.

    python -m pipelines.deploy up [--home DIR] [--profile deploy/cluster.yaml] [--sweep sweep.yaml]
    python -m pipelines.deploy sweep [--home DIR] [--sweep sweep.yaml]      # run the sweep through it
    python -m pipelines.deploy status [--home DIR]   # exit 0: all run, 1: some stopped, 3: none started
    python -m pipelines.deploy down [--home DIR]
    python -m pipelines.deploy worker --name w3 --queues gpu [--profile FILE] [--home DIR]   # another machine;
                                        # its --home holds a copy of the head's secrets.env (or export them)
    python -m pipelines.deploy pools --profile FILE     # the file's pool limits on the instance at DAGSTER_HOME
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from fewshot_core.errors import FsadError
from pipelines.deploy import local
from pipelines.placement.credentials import secrets_path
from pipelines.placement.profile import load_profile, read_pools

# `status` exits as an init script's status does (LSB), so scripts can tell "stopped" from "never started"
STATUS_RUNNING, STATUS_DEAD, STATUS_NOT_STARTED = 0, 1, 3
STATUS_EPILOG = (f"exit status: {STATUS_RUNNING} every service runs, {STATUS_DEAD} some recorded service has "
                 f"stopped, {STATUS_NOT_STARTED} no service was started under the home")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("up", "start PostgreSQL, Redis, MLflow server, Dagster webserver + daemon, Celery workers"),
                       ("down", "stop everything `up` started (by its pid files)"),
                       ("status", "list the services `up` started and whether they run"),
                       ("sweep", "run the configured sweep through the running profile"),
                       ("worker", "run one Celery worker in the foreground (other machines)"),
                       ("pools", "set the profile's pool limits on the Dagster instance at $DAGSTER_HOME")):
        s = sub.add_parser(name, help=text, description=text, epilog=STATUS_EPILOG if name == "status" else None)
        s.add_argument("--home", help="cluster home: service data, logs, pid files (default: $FSAD_CLUSTER_HOME, "
                                      "else ./.cluster)")
        s.add_argument("--profile", help="cluster profile YAML (default: $FSAD_PROFILE_CONFIG, else "
                                         "deploy/cluster.yaml)")
        if name in ("up", "sweep", "worker"):
            s.add_argument("--sweep", help="sweep YAML every process builds the code location from "
                                           "(default: $FSAD_SWEEP_CONFIG, else the embedded default)")
        if name == "worker":
            s.add_argument("--name", required=True, help="worker name, unique in the cluster")
            s.add_argument("--queues", default="cpu", help="comma-separated pools it serves (cpu, gpu)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except FsadError as exc:
        print(f"fsad deploy: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "pools":  # any profile file with `pools:` (the k8s one has no cluster keys)
        limits = read_pools(args.profile or os.environ.get("FSAD_PROFILE_CONFIG") or "deploy/cluster.yaml")
        import dagster as dg  # Dagster: status, up and down need none

        with dg.DagsterInstance.get() as instance:
            for pool, limit in limits.items():
                instance.event_log_storage.set_concurrency_slots(pool, limit)
        print("pool limits set: " + ", ".join(f"{p}={n}" for p, n in limits.items()))
        return 0

    prof = load_profile(args.profile, args.home)
    sweep = getattr(args, "sweep", None) or os.environ.get("FSAD_SWEEP_CONFIG")
    if args.command == "up":
        start = time.perf_counter()
        local.up(prof, sweep, log=lambda m: print(f"  starting {m}", flush=True))
        print(f"up in {time.perf_counter() - start:.0f}s; Dagster UI http://{prof.host}:{prof.ports['webserver']}, "
              f"MLflow {prof.mlflow_uri}; stop with `python -m pipelines.deploy down --home {prof.home}`")
        return 0
    if args.command == "down":
        if not local.down(prof):
            print(f"nothing recorded as started under {prof.home}")
        return 0
    if args.command == "status":
        services = local.status(prof)
        if not services:
            print(f"nothing running: no service was started under {prof.home} (start them with "
                  f"`python -m pipelines.deploy up --home {prof.home}`)")
            return STATUS_NOT_STARTED
        for name, (pid, alive) in services.items():
            print(f"{name:16s} pid {pid}  {'running' if alive else 'not running'}")
        try:
            prof.secrets
            print(f"{'secrets':16s} {secrets_path(prof.home)} (or the environment)")
        except FsadError as exc:
            print(f"{'secrets':16s} {exc}")
        return STATUS_RUNNING if all(alive for _, alive in services.values()) else STATUS_DEAD
    env = local._python_env(prof, sweep)
    os.environ.update(env)  # before the code location is imported: it reads the profile from the environment
    if args.command == "worker":
        queues = [q.strip() for q in args.queues.split(",") if q.strip()]
        if bad := sorted(set(queues) - set(prof.pools)):
            raise FsadError(f"--queues {args.queues}: {', '.join(bad)} name no pool of {prof.path}; use "
                            f"{', '.join(prof.pools)}")
        cmd = local.worker_command(prof, args.name, queues)
        os.execv(cmd[0], cmd)
    # the code location reads the profile from the environment set above; Dagster: status needs none
    import dagster as dg

    from pipelines.definitions import build_definitions
    from pipelines.deploy.submit import run_sweep_on_cluster

    defs = build_definitions()
    start = time.perf_counter()
    with dg.DagsterInstance.from_config(str(prof.dagster_home)) as instance:
        runs = run_sweep_on_cluster(prof, defs, instance, log=lambda m: print("  " + m, flush=True))
    print(f"sweep done in {time.perf_counter() - start:.0f}s ({len(runs)} Dagster runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
