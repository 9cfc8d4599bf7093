"""Dump a saved migration stream (``migrate file:PATH``) in human-readable form.

Prints the header, every command and section (type, id, idstr, instance,
version), the RAM block list, the PAGE/ZERO record counts of each RAM section
(each record with --pages), device sections, EOF and the JSON VM description.
The stream is decoded by channels.codec.StreamDecoder, so it is validated as
a destination would; the RAM blocks are learned from the MEM_SIZE list.

    python tools/dump_stream.py saved.stream
    python tools/dump_stream.py --json --pages < saved.stream

Exit status 1, with the decoder's message, if the stream is invalid.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ferry_migrate.channels import codec, devices
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.channel import RamRecvChannel
from ferry_migrate.channels.errors import ChannelError
from ferry_migrate.channels.qemufile import QEMUFileReader
from ferry_migrate.channels.transport import FileTransport
from ferry_migrate.engine.source import GUEST_DEVICE, GUEST_DEVICE_VERSION

DEVICES = [codec.DeviceSpec(GUEST_DEVICE, GUEST_DEVICE_VERSION)]  # device sections Ferry knows


def _payload(data: bytes):
    """A device payload as JSON if it is JSON, else its length and first bytes in hex."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {"hex": data[:64].hex(), "truncated": len(data) > 64}


def dump(path: str, pages: bool, result: dict, emit=lambda kind, item: None) -> dict:
    """Decode the stream at ``path`` ('-' = stdin) into ``result``.

    ``result["items"]`` gets one dict per header, command, section, footer,
    EOF and VM description, in stream order; ``emit(kind, item)`` is called as
    each arrives (for printing as we go). A RAM section's counts are filled in
    at its footer. Raises ProtocolError / ChannelError on a bad stream, with
    ``result`` holding what was decoded up to there.
    """
    transport = FileTransport("/dev/stdin" if path == "-" else path, "r")
    dec = codec.StreamDecoder([], devices=DEVICES, learn_blocks=True, channel_name=path, opaque_devices=True)
    ch = RamRecvChannel(QEMUFileReader(transport, name=path), dec, name=path)
    items = result.setdefault("items", [])
    totals = result.setdefault("blocks", {})
    cur = None  # the RAM section being read
    tail_off = None  # where QEMU's device sections start (delimited by the vmdesc at the end)

    def add(kind, off, **fields):
        item = {"kind": kind, "offset": off, **fields}
        items.append(item)
        emit(kind, item)
        return item

    try:
        while True:
            off = dec.offset
            ev = ch.next_event()
            if ev is None:
                if dec.in_device_tail:
                    raise devices.tail_error(dec.tail)
                break
            if isinstance(ev, codec.RamRun):
                n = len(ev.pages)
                kind = "ZERO" if ev.zero else "PAGE"
                cur["zero" if ev.zero else "pages"] += n
                t = totals[ev.block.idstr]
                t["zero" if ev.zero else "pages"] += n
                if pages:
                    recs = [[ev.block.idstr, int(p) << C.TARGET_PAGE_BITS, kind] for p in ev.pages]
                    cur["records"].extend(recs)
                    for r in recs:
                        emit("record", {"block": r[0], "offset": r[1], "type": kind})
            elif isinstance(ev, codec.Header):
                add("header", off, magic="QEVM", version=ev.version)
            elif isinstance(ev, codec.Configuration):
                add("configuration", off, name=ev.name)
            elif isinstance(ev, codec.Command):
                add("command", off, cmd=ev.name, code=ev.cmd, length=len(ev.payload), payload=ev.payload.hex())
            elif isinstance(ev, (codec.SectionStart, codec.SectionPart)):
                f = {"type": C.SECTION_TYPE_NAMES[ev.section_type].replace("SECTION_", ""),
                     "id": ev.section_id, "idstr": dec.sections.get(ev.section_id)}
                if isinstance(ev, codec.SectionStart):
                    f.update(instance=ev.instance_id, version=ev.version_id)
                if f["idstr"] == C.RAM_SECTION_IDSTR:
                    f.update(pages=0, zero=0, **({"records": []} if pages else {}))
                item = add("section", off, **f)
                cur = item if f["idstr"] == C.RAM_SECTION_IDSTR else None
            elif isinstance(ev, codec.RamBlockList):
                blocks = [{"idstr": n, "length": ln, "page-size": ps} for n, ln, ps in ev.blocks]
                for b in blocks:
                    totals.setdefault(b["idstr"], {"length": b["length"], "pages": 0, "zero": 0})
                cur["blocks"] = blocks
                cur["total"] = ev.total
                emit("ram-blocks", cur)
            elif isinstance(ev, codec.RamEOS):
                emit("eos", {"offset": off})
            elif isinstance(ev, codec.DeviceState):
                items[-1].update(size=len(ev.payload), state=_payload(ev.payload))
                emit("device", items[-1])
            elif isinstance(ev, codec.SectionFooter):
                emit("footer", {"offset": off, "id": ev.section_id, "section": cur})
                cur = None
            elif isinstance(ev, codec.EndOfStream):
                add("eof", off)
            elif isinstance(ev, codec.VMDescription):
                add("vmdesc", off, json=ev.json)
            elif isinstance(ev, codec.DeviceBytes):
                tail_off = off if tail_off is None else tail_off
            elif isinstance(ev, devices.DeviceTail):
                # Opaque device sections: sizes from the vmdesc, bytes not interpreted.
                pos = off if tail_off is None else tail_off
                for sec in ev.sections:
                    add("section", pos, type=C.SECTION_TYPE_NAMES[sec.section_type].replace("SECTION_", ""),
                        id=sec.section_id, idstr=sec.idstr, instance=sec.instance_id, version=sec.version_id,
                        size=sec.payload_size)
                    pos += len(sec.raw)
                add("eof", pos)
                add("vmdesc", pos + 1, json=ev.vmdesc)
    finally:
        result["bytes"] = dec.offset
        if cur is not None:  # a RAM section cut short by an error
            result["open-section"] = cur
        transport.close()
    return result


def _size(n: int) -> str:
    for unit, sh in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << sh:
            return f"{n / (1 << sh):g} {unit}"
    return f"{n} B"


def printer(out=sys.stdout):
    """emit() that prints the dump as text, line by line."""
    def emit(kind, it):
        at = f"[{it['offset']:#010x}] " if "offset" in it else " " * 13
        if kind == "header":
            print(f"{at}header: magic {it['magic']}, version {it['version']}", file=out)
        elif kind == "configuration":
            print(f"{at}configuration: machine {it['name']!r}", file=out)
        elif kind == "command":
            p = f", payload {it['payload']}" if it["length"] else ""
            print(f"{at}command {it['cmd']} ({it['code']}), {it['length']} bytes{p}", file=out)
        elif kind == "section":
            extra = f" instance {it['instance']} version {it['version']}" if "instance" in it else ""
            print(f"{at}section {it['type']} id {it['id']} {it['idstr']!r}{extra}", file=out)
        elif kind == "ram-blocks":
            print(f"{' ' * 15}RAM block list, total {_size(it['total'])} ({it['total']:#x}):", file=out)
            for b in it["blocks"]:
                ps = f", page size {_size(b['page-size'])}" if b["page-size"] else ""
                print(f"{' ' * 17}{b['idstr']}: {_size(b['length'])} ({b['length']:#x}){ps}", file=out)
        elif kind == "record":
            print(f"{' ' * 17}{it['block']} {it['offset']:#014x} {it['type']}", file=out)
        elif kind == "eos":
            print(f"{at}  EOS", file=out)
        elif kind == "device":
            print(f"{' ' * 15}device state, {it['size']} bytes: {json.dumps(it['state'])}", file=out)
        elif kind == "footer":
            s = it["section"]
            counts = f": {s['pages']} PAGE, {s['zero']} ZERO records" if s is not None else ""
            print(f"{at}footer id {it['id']}{counts}", file=out)
        elif kind == "eof":
            print(f"{at}EOF", file=out)
        elif kind == "vmdesc":
            print(f"{at}VM description:", file=out)
            print(json.dumps(it["json"], indent=2), file=out)
    return emit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stream", nargs="?", default="-", help="saved stream (default: stdin)")
    p.add_argument("--pages", action="store_true", help="list every PAGE/ZERO record")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = p.parse_args(argv)
    result: dict = {"stream": args.stream}
    err = None
    try:
        dump(args.stream, args.pages, result, emit=(lambda k, i: None) if args.json else printer())
    except BrokenPipeError:  # e.g. piped into head
        sys.stdout = open(os.devnull, "w")
        return 0
    except (ChannelError, OSError) as e:  # ProtocolError is a ChannelError
        err = str(e) if not isinstance(e, OSError) else f"{args.stream}: {e.strerror or e}"
    if args.json:
        print(json.dumps({**result, **({"error": err} if err else {})}))
    else:
        if "bytes" in result and not err:
            blocks = ", ".join(f"{n}: {t['pages']} PAGE, {t['zero']} ZERO" for n, t in result["blocks"].items())
            print(f"{result['bytes']} bytes; {blocks or 'no RAM records'}")
    if err:
        s = result.get("open-section")
        if s is not None and not args.json:
            print(f"{' ' * 13}(section {s['id']} cut short after {s['pages']} PAGE, {s['zero']} ZERO records)")
        print(f"dump_stream: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
