"""`ferry testbed up|down`: network namespaces joined by veth, with workers inside, that outlive the command.

``up`` creates one namespace per host (engine/testbed.py), joins every pair with a
veth link (optionally rate limited with tbf in both directions), starts a source
worker in the first host and a destination worker in each other one (``ip netns
exec NS ferry worker ... --control ipc://PATH``: ipc paths are files, reachable
from every namespace), and records all of it in a state file. ``down`` reads the
state file, stops those workers and deletes those namespaces, and nothing else.

The namespaces are named ``ferry-tb<hash of the state file>-<host>``, not
``ferry-<pid>-...``: the creating command exits right away, and
engine.testbed.cleanup_stale would otherwise take them for leftovers of a crash.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_STATE = "/tmp/ferry-testbed.json"
MAX_HOSTS = 8
STOP_WAIT = 10.0  # s a worker gets to exit after SIGTERM before SIGKILL


def add_testbed_parser(sub) -> None:
    """The `testbed` command group (argparse only: imported by every `ferry` invocation)."""
    from .cli import add_guest_options

    t = sub.add_parser("testbed", help="network namespaces joined by veth, with workers inside (root)",
                       description="A testbed of network namespaces on this host: `up` creates them and starts "
                                   "workers inside, `down` removes everything `up` created.")
    ts = t.add_subparsers(dest="testbed_command", metavar="SUBCOMMAND")
    u = ts.add_parser("up", help="create the namespaces and links, start a worker in each",
                      description="Host h1 runs a source worker, h2..hN destination workers; every pair of hosts "
                                  "shares a veth link (10.231.<link>.1 and .2). Prints the control endpoints and "
                                  "the migration address of each destination.")
    u.add_argument("--hosts", type=int, default=2, help=f"number of hosts (namespaces), 2..{MAX_HOSTS} (default 2)")
    u.add_argument("--rate", help="tbf rate limit of each link in each direction, e.g. 1gbit, 100mbit "
                                  "(default: no limit)")
    u.add_argument("--state", default=DEFAULT_STATE, metavar="FILE",
                   help=f"where to record what was created (default {DEFAULT_STATE})")
    u.add_argument("--no-workers", action="store_true", help="only the namespaces and links")
    u.add_argument("--json", action="store_true", help="print the state as JSON")
    add_guest_options(u)
    u.set_defaults(func=cmd_testbed_up)
    d = ts.add_parser("down", help="stop the testbed's workers and delete its namespaces",
                      description="Reads the state file written by `up`, stops the workers recorded there and "
                                  "deletes the namespaces recorded there; then removes the state file.")
    d.add_argument("--state", default=DEFAULT_STATE, metavar="FILE", help=f"the state file (default {DEFAULT_STATE})")
    d.add_argument("--keep-logs", action="store_true", help="keep the workers' log files")
    d.add_argument("--json", action="store_true", help="print what was removed as JSON")
    d.set_defaults(func=cmd_testbed_down)

    def no_sub(args) -> int:
        t.print_help()
        return EXIT_USAGE
    t.set_defaults(func=no_sub)


def _error(msg: str, code: int) -> int:
    print(f"ferry: error: {msg}", file=sys.stderr)
    return code


def state_dir(state: str) -> str:
    """The directory beside the state file for ipc sockets and logs (short: ipc paths max 107 bytes)."""
    base = os.path.abspath(state)
    d = (base[:-5] if base.endswith(".json") else base) + ".d"
    if len(d) > 80:
        d = f"/tmp/ferry-tb-{_tag(state)}.d"
    return d


def _tag(state: str) -> str:
    return hashlib.sha1(os.path.abspath(state).encode()).hexdigest()[:6]


def _load(state: str) -> dict | None:
    try:
        with open(state) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _save(state: str, doc: dict) -> None:
    tmp = f"{state}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, state)


def _proc_of(w: dict):
    """The recorded worker's process if it is still that process (pid and start time match), else None."""
    import psutil

    try:
        p = psutil.Process(w["pid"])
        if abs(p.create_time() - w.get("create-time", 0)) > 1.0:
            return None  # the pid was reused by another process
        if p.status() == psutil.STATUS_ZOMBIE:
            return None  # exited; its new parent (init) has not reaped it yet
        return p
    except (psutil.NoSuchProcess, KeyError):
        return None


def _alive(doc: dict) -> list[str]:
    """What of a recorded testbed still exists: namespaces and worker pids."""
    from .testbed import list_namespaces

    have = set(list_namespaces())
    left = [ns for ns in doc.get("namespaces", {}).values() if ns in have]
    left += [f"pid {w['pid']}" for w in doc.get("workers", []) if _proc_of(w) is not None]
    return left


def _stop_worker(w: dict) -> str:
    """SIGTERM the worker's process group (its own session), wait, then SIGKILL."""
    p = _proc_of(w)
    if p is None:
        return "gone"
    try:
        os.killpg(w["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return "gone"
    if _wait_exit(p, STOP_WAIT):
        return "stopped"
    try:
        os.killpg(w["pid"], signal.SIGKILL)
    except ProcessLookupError:
        pass
    _wait_exit(p, 5)
    return "killed"


def _wait_exit(p, timeout: float) -> bool:
    """Wait until ``p`` exited. Not our child: it is reaped by init, which may take a
    while, so a zombie counts as exited (psutil's wait would wait for the reaping)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def _teardown(doc: dict, keep_logs: bool) -> dict:
    """Stop the recorded workers, delete the recorded namespaces and files; returns what was done."""
    from .testbed import NETNS_DIR, _run

    done = {"workers": {}, "namespaces": {}, "dir": doc.get("dir")}
    for w in doc.get("workers", []):
        done["workers"][w["host"]] = {"pid": w["pid"], "result": _stop_worker(w)}
    for host, ns in doc.get("namespaces", {}).items():
        r = _run(["ip", "netns", "del", ns], check=False)
        if r.returncode == 0:
            done["namespaces"][ns] = "deleted"
        elif not os.path.exists(os.path.join(NETNS_DIR, ns)):
            done["namespaces"][ns] = "gone"
        else:
            done["namespaces"][ns] = f"error: {r.stderr.strip()}"
    d = doc.get("dir")
    if d and os.path.isdir(d):
        if keep_logs:
            for name in os.listdir(d):
                if not name.endswith(".log"):
                    try:
                        os.unlink(os.path.join(d, name))
                    except OSError:
                        pass
        else:
            shutil.rmtree(d, ignore_errors=True)
    return done


def cmd_testbed_up(args) -> int:
    from .control.spawn import WorkerStartError, spawn_worker
    from .testbed import LinkShape, Testbed, TestbedError, TestbedUnavailable, check_available, parse_rate

    if not 2 <= args.hosts <= MAX_HOSTS:
        return _error(f"--hosts {args.hosts}: expected 2..{MAX_HOSTS}", EXIT_USAGE)
    try:
        rate = parse_rate(args.rate) if args.rate else None
        if rate is not None and rate < 8000:
            raise ValueError(f"rate {args.rate!r}: at least 8kbit")
        if not args.no_workers:
            from .cli import make_guest

            make_guest(args)  # validate the guest options before creating anything
    except ValueError as e:
        return _error(str(e), EXIT_USAGE)
    state = os.path.abspath(args.state)
    old = _load(state)
    if old is not None:
        left = _alive(old)
        if left:
            return _error(f"a testbed is already up ({', '.join(left)}; state {state}): "
                          f"`ferry testbed down --state {state}` first", EXIT_USAGE)
    try:
        check_available(shaping=rate is not None)
    except TestbedUnavailable as e:
        return _error(f"testbed unavailable: {e}", EXIT_USAGE)
    hosts = tuple(f"h{i}" for i in range(1, args.hosts + 1))
    links = [(a, b) for i, a in enumerate(hosts) for b in hosts[i + 1:]]
    tb = Testbed(hosts=hosts, links=links, shape=LinkShape(rate) if rate else None)
    tb.prefix = f"ferry-tb{_tag(state)}-"  # see the module docstring
    d = state_dir(state)
    os.makedirs(d, exist_ok=True)
    doc = {"created": time.time(), "state": state, "dir": d, "prefix": tb.prefix, "rate-bps": rate,
           "namespaces": {}, "links": [], "workers": [], "migration": {}}
    workers = []
    try:
        tb.setup()
        doc["namespaces"] = dict(tb.ns)
        doc["links"] = [{"hosts": [lk.a, lk.b], "ifname": lk.ifname,
                         "addresses": {lk.a: lk.address(lk.a), lk.b: lk.address(lk.b)}, "rate-bps": rate}
                        for lk in tb.link_objs]
        # Recorded before any worker starts: `down` can clean up whatever happens next.
        _save(state, doc)
        if not args.no_workers:
            from .cli import guest_options

            for h in hosts:
                role = "source" if h == hosts[0] else "destination"
                w = spawn_worker(role, f"ipc://{d}/{h}.ctl", guest_options(args),
                                 log_path=os.path.join(d, f"{h}.log"), new_session=True,
                                 wrapper=["ip", "netns", "exec", tb.ns[h]])
                workers.append((h, w))
            for h, w in workers:
                w.wait_ready()
                import psutil

                doc["workers"].append({"host": h, "role": w.role, "namespace": tb.ns[h], "pid": w.pid,
                                       "create-time": psutil.Process(w.pid).create_time(),
                                       "control": w.control, "events": w.events, "log": w.log_path})
                # The ready line was the only thing a worker writes on stdout;
                # our end of the pipe closes with this command.
                w._close_pipes()
            for h in hosts[1:]:
                addr = tb.address(h, hosts[0])
                doc["migration"][h] = {"address": addr, "uri": f"tcp:{addr}:0"}
        _save(state, doc)
    except (TestbedError, WorkerStartError, OSError) as e:
        for _, w in workers:
            w.kill()
        _teardown({**doc, "namespaces": dict(tb.ns), "workers": []}, keep_logs=True)
        try:
            os.unlink(state)
        except OSError:
            pass
        return _error(f"testbed up: {e}", EXIT_FAILED)
    except KeyboardInterrupt:
        for _, w in workers:
            w.kill()
        _teardown({**doc, "namespaces": dict(tb.ns), "workers": []}, keep_logs=False)
        try:
            os.unlink(state)
        except OSError:
            pass
        return 130
    if args.json:
        print(json.dumps(doc), flush=True)
        return EXIT_OK
    _print_up(doc, hosts)
    return EXIT_OK


def _print_up(doc: dict, hosts: tuple) -> None:
    rate = doc["rate-bps"]
    print(f"testbed up: {len(hosts)} hosts, {len(doc['links'])} link(s)"
          + (f", tbf {rate / 1e6:g} Mbit/s each way" if rate else ", no rate limit"))
    by_host = {w["host"]: w for w in doc["workers"]}
    for h in hosts:
        addrs = ", ".join(lk["addresses"][h] for lk in doc["links"] if h in lk["hosts"])
        w = by_host.get(h)
        who = f"{w['role']:<11} pid {w['pid']:<7} control {w['control']}" if w else "(no worker)"
        print(f"  {h}  {doc['namespaces'][h]:<22} {addrs:<16} {who}")
    if doc["workers"] and len(hosts) > 1:
        src = by_host[hosts[0]]
        dst = by_host[hosts[1]]
        uri = doc["migration"][hosts[1]]["uri"]
        print(f"  migration address of {hosts[1]}: {doc['migration'][hosts[1]]['address']}")
        # The namespaces' links are private: plain TCP there, said explicitly (docs/multi-host.md).
        print(f"\n  ferry migrate --source {src['control']} --destination {dst['control']} --uri {uri} "
              "--param plaintext-off-loopback=true")
    print(f"  ferry testbed down --state {doc['state']}")


def cmd_testbed_down(args) -> int:
    state = os.path.abspath(args.state)
    doc = _load(state)
    if doc is None:
        msg = {"state": state, "removed": None}
        if args.json:
            print(json.dumps(msg))
        else:
            print(f"testbed down: no testbed recorded in {state}; nothing to do")
        return EXIT_OK
    done = _teardown(doc, args.keep_logs)
    errors = [f"{ns}: {r}" for ns, r in done["namespaces"].items() if r.startswith("error")]
    if not errors:
        os.unlink(state)
    if args.json:
        print(json.dumps({"state": state, "removed": done, "errors": errors}))
    else:
        for h, w in done["workers"].items():
            print(f"  worker on {h} (pid {w['pid']}): {w['result']}")
        for ns, r in done["namespaces"].items():
            print(f"  namespace {ns}: {r}")
        print(f"testbed down: {'done' if not errors else 'errors: ' + '; '.join(errors)}")
    return EXIT_OK if not errors else EXIT_FAILED
