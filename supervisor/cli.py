"""``supervisor``: start a run, show its health, restart or stop its processes, inject faults.

Exit status of ``supervisor status``: 0 when every process is running, 3 when
some are not, 4 when no supervisor answers. ``supervisor up`` refuses, writing
nothing, with 2 for a config error (or a resume that would change the run's model
or replay), 5 when another supervisor runs the run, 6 when the host cannot hold
the workers asked for. An operating-system error (``up``, ``status``, ...) ends in
one line naming the path and what to do, with 7 for a refused permission, 8 for a
read-only file system, 9 for a full disk and 10 for any other. Nothing here
imports torch or gymnasium, so ``status`` answers fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from protocol.exits import (  # noqa: F401 (the CLI's codes)
    EXIT_NO_SPACE,
    EXIT_OS_ERROR,
    EXIT_PERMISSION,
    EXIT_READ_ONLY,
)
from protocol.states import FAILED, RUNNING

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DEGRADED, EXIT_NO_SUPERVISOR = 0, 1, 2, 3, 4
EXIT_RUN_BUSY, EXIT_OVERLOAD = 5, 6
CONTROL_TIMEOUT_MS = 1500


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supervisor", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the stack in the foreground")
    up.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    up.add_argument("--max-timesteps", type=int)
    up.add_argument("--workers", type=int)
    up.add_argument("--seed", type=int)
    up.add_argument("--eval-freq", type=int)
    up.add_argument("--debug", action="store_true", default=None)
    up.add_argument("--scenario", help="CARLA: a scenario of env.carla.scenarios, by index or name")
    up.add_argument("--npcs", type=int, help="CARLA: NPC vehicles per slot")
    up.add_argument("--run-id", help="run id (an existing run is resumed, with its own saved config)")
    up.add_argument("--resume-from", choices=("latest", "previous"), default="latest",
                    help="resume from the latest checkpoint, or set a corrupt one aside and take the one before")
    up.add_argument("--oversubscribe", action="store_true",
                    help="start even when the workers asked for exceed what this host can run")
    up.add_argument("--runs-dir", help="where run directories go (default: runs)")
    up.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key, e.g. --set learner.batch_size=128")
    up.add_argument("--role", choices=("all", "workers"),
                    help="workers: only this host's slots, against the learner at --learner (docs/hosts.md)")
    up.add_argument("--learner", dest="learner_endpoint", metavar="tcp://HOST:PORT",
                    help="the learner's endpoint on another host")
    up.add_argument("--key", metavar="PATH", help="this host's secret key (NAME.key_secret from `supervisor keys`)")
    up.add_argument("--learner-key", metavar="PATH", help="the learner's public key (its NAME.key)")
    up.add_argument("--host", help="what this host's workers are called at the learner (default: the hostname)")
    up.add_argument("--engine", choices=("local", "ray"),
                    help="ray: the learner here and a host agent on each Ray node offering carla_host (docs/fleet.md)")
    up.add_argument("--address", help="the Ray cluster's address (default: RAY_ADDRESS, else auto)")
    up.add_argument("--live", dest="live", action="store_true", default=None, help="live table (default on a tty)")
    up.add_argument("--no-live", dest="live", action="store_false")

    for name, helptext in (("status", "show every process's health"), ("restart", "restart one process"),
                           ("stop", "stop the run")):
        p = sub.add_parser(name, help=helptext)
        if name == "restart":
            p.add_argument("name", help="the process, as `supervisor status` names it")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--run-dir", type=Path, help="the run (default: RUNS_DIR/latest)")
        p.add_argument("--runs-dir", type=Path, default=Path("runs"))

    chaos = sub.add_parser("chaos", help="inject a fault into the running stack (see `supervisor chaos --list`)")
    chaos.add_argument("fault", nargs="?", help="the fault; --list names them all")
    chaos.add_argument("--target", help="the child to hit (default: a random running one the fault applies to); "
                                        "for garbage: heartbeat, control or steps (default: all three)")
    chaos.add_argument("--slow-s", type=float, help="slow: seconds each env step sleeps (default chaos.slow_s)")
    chaos.add_argument("--duration-s", type=float, help="slow: for how long (default chaos.slow_duration_s)")
    chaos.add_argument("--list", action="store_true", help="list the faults and exit")
    chaos.add_argument("--run-dir", type=Path, help="the run (default: RUNS_DIR/latest)")
    chaos.add_argument("--runs-dir", type=Path, default=Path("runs"))

    rep = sub.add_parser("report", help="write RUN_DIR/report/report.md: status, expected against observed, "
                                        "divergence verdict, incidents, plots")
    rep.add_argument("run_dir", type=Path, nargs="?", help="the run (default: RUNS_DIR/latest)")
    rep.add_argument("--runs-dir", type=Path, default=Path("runs"))
    rep.add_argument("--compare", type=Path, action="append", default=[], metavar="OTHER_RUN",
                     help="another run to put side by side in the table and the plots (repeatable)")
    rep.add_argument("--html", action="store_true", help="also write report.html, one page with the plots embedded")
    rep.add_argument("--json", action="store_true", help="print the summary as JSON")

    keys = sub.add_parser("keys", help="write a CurveZMQ key pair for the wire across hosts: NAME.key (public, "
                                       "to copy to the peer) and NAME.key_secret, both 0600")
    keys.add_argument("name", help="the pair's name, e.g. the host's (a learner: `learner`)")
    keys.add_argument("--dir", type=Path, default=Path("keys"), help="where to write them (default: keys)")
    return parser


def cmd_keys(args) -> int:
    from protocol.curve import write_keypair

    try:
        public, secret = write_keypair(args.dir, args.name)
    except (ValueError, FileExistsError) as exc:
        print(f"supervisor keys: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {public} (public: copy it to the peer) and {secret} (secret: it stays on this host)")
    return EXIT_OK


def cmd_up(args) -> int:
    from supervisor.preflight import Refused, check_up

    try:
        ready = check_up(args)
    except Refused as exc:
        print(exc, file=sys.stderr)
        return exc.code
    from supervisor.loop import Supervisor
    from supervisor.preflight import set_previous_checkpoint_aside
    from supervisor.rundir import RunBusy, create_run_dir

    for line in ready.warnings:
        print(line, file=sys.stderr)
    cfg = ready.cfg
    if ready.run_dir is not None and args.resume_from == "previous":
        print(f"supervisor up: {set_previous_checkpoint_aside(ready.run_dir)}", file=sys.stderr)
    try:
        run_dir = create_run_dir(cfg, locked=ready.locked)
    except RunBusy as exc:
        print(f"supervisor up: {exc}", file=sys.stderr)
        return EXIT_RUN_BUSY
    live = sys.stdout.isatty() if args.live is None else args.live
    env = f"CARLA {cfg.env.carla.map} ({cfg.simulators.mode} simulators)" if cfg.env.backend == "carla" else cfg.env.id
    print(f"run {run_dir.name}: {cfg.workers.count} workers on {env}, learner on {cfg.learner.device}; "
          f"run dir {run_dir}", flush=True)
    try:
        supervisor = Supervisor(cfg, run_dir, live=live)
        code = supervisor.run()
    except RuntimeError as exc:
        print(f"supervisor: {exc}", file=sys.stderr)
        return EXIT_ERROR
    ended = f": {supervisor.machine.stop_reason}" if code else ""
    print(f"run {run_dir.name} ended (exit {code}){ended}; events in {run_dir / 'events.jsonl'}", flush=True)
    return code


def resolve_run_dir(args) -> Path:
    return args.run_dir if args.run_dir is not None else args.runs_dir / "latest"


def request(run_dir: Path, cmd: str, name: str | None = None, timeout_ms: int = CONTROL_TIMEOUT_MS,
            **fields) -> dict | None:
    """One control request; None when no supervisor answers in time."""
    if not run_dir.exists():
        return None
    import zmq

    from protocol.codec import decode
    from protocol.messages import CONTROL_REQUEST
    from protocol.sockets import ipc_path, load_endpoints, make_socket, send

    endpoint = load_endpoints(run_dir)["control"]
    path = ipc_path(endpoint)
    if path is not None and not path.exists():
        return None
    ctx = zmq.Context.instance()
    sock = make_socket(ctx, zmq.REQ, hwm=1)
    try:
        sock.connect(endpoint)
        send(sock, CONTROL_REQUEST, {"cmd": cmd, **({"name": name} if name else {}),
                                     **{k: v for k, v in fields.items() if v is not None}})
        if not sock.poll(timeout_ms):
            return None
        return decode(sock.recv_multipart()).fields
    finally:
        sock.close(0)


def no_supervisor(run_dir: Path) -> int:
    print(f"no supervisor answers for {run_dir} (is a run up? start one with `make up`)", file=sys.stderr)
    return EXIT_NO_SUPERVISOR


def cmd_status(args) -> int:
    run_dir = resolve_run_dir(args)
    reply = request(run_dir, "status")
    if reply is None or not reply.get("ok"):
        return ended_run(run_dir, args.json)
    status = reply["data"]
    if args.json:
        print(json.dumps(status_json(status), indent=2))
    else:
        from supervisor.display import plain_table, status_notes

        print(plain_table(status), end="")
        print(f"env steps {status['env_steps']}/{status['max_timesteps']}   incidents {status['incidents']}   "
              f"dropped messages {status['dropped_messages']}")
        for line in status_notes(status):
            print(line)
    all_running = all(p["state"] == RUNNING for p in status["processes"])
    return EXIT_OK if all_running else EXIT_DEGRADED


STATUS_KEYS = ("name", "role", "state", "pid", "restarts", "uptime_s", "heartbeat_age_s", "phase", "env_steps",
               "updates", "incarnation", "steps_per_s", "rss_bytes", "alerts", "last_incident", "cause",
               "cause_incident", "reason", "gpu_memory_bytes", "detail", "dropped", "resumed", "refused", "hosts")


def status_json(status: dict) -> dict:
    return {"run_id": status["run_id"], "run_dir": status["run_dir"],
            "processes": [{k: p.get(k) for k in STATUS_KEYS} for p in status["processes"]],
            "env_steps": status["env_steps"], "max_timesteps": status["max_timesteps"],
            "incidents": status["incidents"], "dropped_messages": status["dropped_messages"],
            "supervisor_dropped": status.get("supervisor_dropped"), "disk": status.get("disk"),
            "ended": status.get("ended")}


def last_run_ended(run_dir: Path) -> dict | None:
    """The last ``run_ended`` line of a run's events, as {time, exit_code, reason}; None when there is none."""
    from protocol.events import RUN_ENDED

    path = run_dir / "events.jsonl"
    if not path.exists():
        return None
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64 * 1024))
        tail = f.read().decode(errors="replace").splitlines()
    for line in reversed(tail):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == RUN_ENDED:
            return {"time": event.get("time"), "exit_code": event.get("exit_code"), "reason": event.get("reason")}
    return None


def ended_run(run_dir: Path, as_json: bool) -> int:
    """No supervisor answers: say so, and how the run ended if its supervisor wrote that down."""
    from protocol.runstate import read_state

    state = read_state(run_dir) if run_dir.exists() else {}
    ended = state.get("ended") or last_run_ended(run_dir)  # a full disk may have kept the state file from saying it
    if not ended:
        if as_json:
            print(json.dumps({"run_dir": str(run_dir), "ended": None, "processes": []}, indent=2))
        return no_supervisor(run_dir)
    if as_json:
        print(json.dumps({"run_dir": str(run_dir), "ended": ended, "processes": state.get("processes", [])},
                         indent=2))
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ended.get("time") or 0))
        print(f"run {state.get('run_id', run_dir.name)} is not running: it ended at {when} with exit "
              f"{ended.get('exit_code')}: {ended.get('reason')}")
        for p in state.get("processes", []):
            if p.get("state") == FAILED:
                print(f"{p['name']} failed: {p.get('reason')}")
    return EXIT_NO_SUPERVISOR


def cmd_simple(args, cmd: str) -> int:
    run_dir = resolve_run_dir(args)
    reply = request(run_dir, cmd, getattr(args, "name", None))
    if reply is None:
        return no_supervisor(run_dir)
    if not reply.get("ok"):
        print(f"supervisor: {reply.get('error')}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{cmd}: {json.dumps(reply.get('data'))}")
    return EXIT_OK


def cmd_chaos(args) -> int:
    from protocol.chaos import FAULTS

    if args.list:
        for f in FAULTS.values():
            print(f"{f.name:16s} {f.target:9s} {'must be repaired' if f.expect == 'restart' else 'must be left alone'}:"
                  f" {f.meaning}")
        return EXIT_OK
    if not args.fault:
        print("supervisor chaos: name a fault; faults: " + ", ".join(FAULTS), file=sys.stderr)
        return EXIT_USAGE
    if args.fault not in FAULTS:
        print(f"supervisor chaos: unknown fault {args.fault!r}; faults: {', '.join(FAULTS)}", file=sys.stderr)
        return EXIT_USAGE
    options = {k: v for k, v in (("slow_s", args.slow_s), ("duration_s", args.duration_s)) if v is not None}
    if options and args.fault != "slow":
        print(f"supervisor chaos: --slow-s and --duration-s are for slow, not {args.fault}", file=sys.stderr)
        return EXIT_USAGE
    run_dir = resolve_run_dir(args)
    reply = request(run_dir, "chaos", args.target, fault=args.fault, options=options or None)
    if reply is None:
        return no_supervisor(run_dir)
    if not reply.get("ok"):
        print(f"supervisor chaos: {reply.get('error')}", file=sys.stderr)
        return EXIT_ERROR
    d = reply["data"]
    said = "the stack must replace it" if d["expect"] == "restart" else "the stack must leave it alone"
    within = f", within {d['deadline_s']:g}s ({d['seen_by']} deadline)" if d.get("deadline_s") is not None else ""
    pid = f" (pid {d['pid']})" if d.get("pid") else ""
    print(f"chaos: fault {d['id']} {d['fault']} -> {d['target']}{pid}; {said}{within}; "
          f"follow it in {run_dir / 'events.jsonl'}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except OSError as exc:  # an operator's mistake (permissions, a read-only or full disk): one line, no traceback
        from protocol.exits import os_error_exit, os_error_line

        print(f"supervisor {args.command}: {os_error_line(exc, '?')}", file=sys.stderr)
        return os_error_exit(exc)


def dispatch(args) -> int:
    if args.command == "up":
        return cmd_up(args)
    if args.command == "status":
        return cmd_status(args)
    if args.command in ("restart", "stop"):
        return cmd_simple(args, args.command)
    if args.command == "chaos":
        return cmd_chaos(args)
    if args.command == "keys":
        return cmd_keys(args)
    if args.command == "report":
        from runreport.report import report

        return report(resolve_run_dir(args), as_json=args.json, html=args.html, compare=args.compare)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
