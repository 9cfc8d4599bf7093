"""`ferry snapshot load|save`: saved VMs into and out of a listening QEMU (or Ferry).

``load FILE --to URI``: the guest is a saved stream or an indexed image
(engine/snapshot.py); it is migrated to a listening destination in precopy, or in
postcopy switched once a share of the pages went out, with postcopy-preempt; every
page request is answered from the guest (zero pages included).

``save --listen URI OUT``: receive a live migration (e.g. from QEMU) with a
destination that takes the source's RAM layout, then write an indexed image.
"""
from __future__ import annotations

import json
import sys
import time

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MODES = ("precopy", "postcopy", "postcopy-preempt")


def add_snapshot_parser(sub) -> None:
    """The `snapshot` command group (argparse only)."""
    s = sub.add_parser("snapshot", help="load a saved VM into a listening QEMU, or save an incoming one",
                       description="Saved QEMU guests: `load` feeds one to a listening destination (QEMU or "
                                   "Ferry), `save` receives a live migration into an indexed image.")
    ss = s.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND")
    ld = ss.add_parser("load", help="migrate a saved guest to a listening destination",
                       description="FILE is a QEMU-saved stream (`migrate exec:cat > FILE`) or an indexed "
                                   "image from `ferry snapshot save`.")
    ld.add_argument("file", metavar="FILE")
    ld.add_argument("--to", required=True, metavar="URI", help="the listening destination: tcp:HOST:PORT or unix:PATH")
    ld.add_argument("--mode", choices=MODES, default="postcopy-preempt",
                    help="precopy, postcopy, or postcopy with preemption (default)")
    ld.add_argument("--switch-at", type=int, default=10, metavar="PERCENT",
                    help="postcopy: switch once this share of pages went out (default 10)")
    ld.add_argument("--peer", choices=("qemu", "ferry"), default="qemu", help="what listens (default qemu)")
    ld.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="a further migration parameter, e.g. max-postcopy-bandwidth=100000000")
    ld.add_argument("--json", action="store_true", help="print the result as JSON")
    ld.set_defaults(func=cmd_snapshot_load)
    sv = ss.add_parser("save", help="receive a live migration into an indexed image",
                       description="Listens on URI like a destination without a fixed guest, takes the "
                                   "source's RAM layout, and writes OUT once the migration completed.")
    sv.add_argument("out", metavar="OUT")
    sv.add_argument("--listen", required=True, metavar="URI", help="tcp:HOST:PORT, unix:PATH or file:PATH")
    sv.add_argument("--max-ram", default="64G", help="most RAM accepted (default 64G)")
    sv.add_argument("--max-blocks", type=int, default=256, help="most RAM blocks accepted (default 256)")
    sv.add_argument("--cap", action="append", default=[], metavar="NAME",
                    help="capability to enable, e.g. postcopy-ram, postcopy-preempt (repeatable)")
    sv.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the migration")
    sv.add_argument("--json", action="store_true", help="print the result as JSON")
    sv.set_defaults(func=cmd_snapshot_save)

    def no_sub(args) -> int:
        s.print_help()
        return EXIT_USAGE
    s.set_defaults(func=no_sub)


def _params(items: list[str]) -> dict:
    out = {}
    for it in items:
        name, _, value = it.partition("=")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    return out


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:24} {v}")


def run_load(path: str, to: str, mode: str = "postcopy-preempt", switch_at: int = 10, peer: str = "qemu",
             params: dict | None = None, on_started=None, timeout: float = 3600) -> dict:
    """Load ``path`` and migrate it to ``to``; returns a result dict (query-migrate of the source + times).

    ``on_started(source)`` is called once the migration runs (benchmarks and
    tests use it to follow the destination). Times in seconds.
    """
    from .params import MigrationConfig
    from .snapshot import load_guest
    from .source import MigrationSource

    t0 = time.monotonic()
    ram, devices, info = load_guest(path)
    cfg = MigrationConfig()
    caps = {}
    if mode != "precopy":
        caps["postcopy-ram"] = True
    if mode == "postcopy-preempt":
        caps["postcopy-preempt"] = True
    cfg.set_capabilities(caps)
    p = {"peer": peer}
    if mode != "precopy":
        p["postcopy-after-percent"] = max(1, switch_at)
    if mode == "postcopy-preempt":
        # Pacing follows the bandwidth precopy measured; switched this early there is
        # hardly any measure, and the image is local: send the background at full speed.
        p["preempt-pace-background"] = False
    p.update(params or {})
    cfg.set_parameters(p)
    src = MigrationSource(ram, None, cfg, devices=devices)
    try:
        src.start(to)
        if on_started is not None:
            on_started(src)
        status = src.wait(timeout)
        q = src.query()
    finally:
        if src.status not in ("completed", "failed", "cancelled"):
            try:
                src.cancel()
            except RuntimeError:
                pass
    total = time.monotonic() - t0
    ram.close()
    return {"status": status, "error": q.get("error-desc"), "file-kind": info["kind"],
            "index-time": round(info["index-time"], 4), "total-time": round(total, 4), "mode": mode,
            "postcopy-requests": q.get("postcopy-requests", 0), "completion": q.get("completion"),
            "transferred": q.get("transferred"), "query-migrate": q}


def cmd_snapshot_load(args) -> int:
    from .snapshot import SnapshotError

    try:
        r = run_load(args.file, args.to, args.mode, args.switch_at, args.peer, _params(args.param))
    except (SnapshotError, ValueError, OSError) as e:
        print(f"ferry snapshot load: {e}", file=sys.stderr)
        return EXIT_FAILED
    q = r.pop("query-migrate")
    if not args.json:
        r["requests-served"] = r.pop("postcopy-requests")
    _print(r if not args.json else {**r, "channels": q.get("channels")}, args.json)
    return EXIT_OK if r["status"] == "completed" else EXIT_FAILED


def run_save(listen: str, out: str, caps: list[str] | None = None, max_ram: str = "64G", max_blocks: int = 256,
             timeout: float = 3600, on_listening=None) -> dict:
    """Receive a migration on ``listen`` and write it to ``out`` as an indexed image."""
    from .destination import MigrationDestination
    from .layout import LayoutLimits
    from .params import MigrationConfig
    from .ram import parse_size
    from .snapshot import write_image

    cfg = MigrationConfig()
    cfg.set_capabilities({c: True for c in caps or []})
    cfg.set_parameters({"peer": "qemu"})
    d = MigrationDestination(None, cfg, layout=LayoutLimits(max_total=parse_size(max_ram), max_blocks=max_blocks))
    real = d.listen(listen)
    if on_listening is not None:
        on_listening(real)
    d.start()
    status = d.wait(timeout)
    q = d.query()
    if status != "completed":
        return {"status": status, "error": q.get("error-desc")}
    t0 = time.monotonic()
    header = write_image(out, d.ram, d.devices)
    d.ram.close()
    return {"status": status, "image": out, "blocks": len(header["blocks"]),
            "device-sections": len(d.devices.sections), "device-bytes": len(d.devices.device_bytes),
            "write-time": round(time.monotonic() - t0, 4), "machine-type": q.get("machine-type")}


def cmd_snapshot_save(args) -> int:
    try:
        r = run_save(args.listen, args.out, args.cap, args.max_ram, args.max_blocks, args.timeout,
                     on_listening=lambda uri: print(f"listening on {uri}", file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:
        print(f"ferry snapshot save: {e}", file=sys.stderr)
        return EXIT_FAILED
    _print(r, args.json)
    return EXIT_OK if r["status"] == "completed" else EXIT_FAILED
