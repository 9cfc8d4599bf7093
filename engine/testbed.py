"""Network-namespace test hosts: namespaces joined by veth pairs, optionally rate limited.

A :class:`Testbed` creates one network namespace per host (``ferry-<pid>-<n>-<host>``),
joins pairs of them with veth links, gives each link a private /24
(``10.231.<link>.0/24``: the first host is .1, the second .2; the addresses exist only
inside our own namespaces, so concurrent testbeds never clash), brings ``lo`` and the
veths up and, if asked, puts a ``tbf`` rate limit on each direction of a link. Leaving
the ``with`` block (also by an exception) deletes the namespaces, which deletes their
veths and qdiscs with them. :func:`cleanup_stale` removes what a crashed run left.

Processes join a namespace with :func:`enter_netns` (``setns(2)`` through libc: Python
3.11 has no ``os.setns``). It moves only the calling thread, and threads started later by
it, so call it first thing in a spawned child, before any socket or thread exists.

Queueing on a shaped link (``LinkShape``): tbf is a token bucket in front of the veth,
one per direction. ``rate`` is the long-term rate; ``burst`` is the bucket size, the
bytes that may leave back to back at veth speed after the link was idle (it must hold
at least one packet; veth sends 64 KiB GSO packets, which tbf cuts to MTU size when
they do not fit). ``latency`` bounds the queue: a packet that would wait longer than
that behind the others is dropped, so the queue holds about ``rate * latency + burst``
bytes. That queue is FIFO and *shared* by every connection going that way: a requested
page sent on its own TCP connection still waits behind the background stream's packets
already queued there. In front of the qdisc, each socket's own send buffer is not
shared; TCP small queues (net.ipv4.tcp_limit_output_bytes, per netns) and the
congestion control decide how much of a bulk flow's data sits in the shared queue.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import multiprocessing as mp
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
PREFIX = "ferry-"
SUBNET = "10.231"  # 10.231.<link>.0/24, only inside our namespaces

_seq = itertools.count()


class TestbedError(RuntimeError):
    """Setting up or tearing down the testbed failed (names the command and its error)."""

    __test__ = False  # not a pytest test class


class TestbedUnavailable(TestbedError):
    """Network namespaces cannot be created here (not root, no ``ip``, no tbf, ...)."""


_RATE_UNITS = {"": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
               "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}


def parse_rate(rate: int | float | str) -> int:
    """Bits per second from an int or tc-style string: ``1gbit``, ``100mbit``, ``125mbps`` (bytes)."""
    if isinstance(rate, (int, float)):
        return int(rate)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", rate)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _RATE_UNITS:
        raise ValueError(f"rate {rate!r}: expected bits/s or a number with bit, kbit, mbit, gbit "
                         "(or bps, kbps, mbps, gbps for bytes/s)")
    return int(float(m.group(1)) * _RATE_UNITS[unit])


@dataclass
class LinkShape:
    """tbf on one direction of a link. See the module docstring for what they mean.

    ``per_flow``: instead of one tbf, each flow (each TCP connection) is held
    to ``rate`` on its own, so N connections get N times the rate, as a
    per-flow policer or a long path's window would give: an HTB class of that
    rate per bucket of a u32 hash on the low byte of the TCP source port (256
    buckets; fq's ``maxrate`` does this directly where sch_fq exists). Two
    connections whose source ports share that byte share a bucket (about 1 in
    256 per pair).
    """

    rate: int | str = "1gbit"  # bits/s
    burst: int = 0  # bytes; 0 = the larger of 32 KiB and 0.5 ms at the rate
    latency: float = 0.010  # s a packet may wait in the queue (bounds the queue's bytes)
    per_flow: bool = False

    @property
    def rate_bps(self) -> int:
        return parse_rate(self.rate)

    @property
    def burst_bytes(self) -> int:
        return self.burst or max(32 << 10, self.rate_bps // 8 // 2000)

    @property
    def queue_bytes(self) -> int:
        """About how many bytes the queue holds at most."""
        return int(self.rate_bps / 8 * self.latency) + self.burst_bytes

    def tc_batch(self, ifname: str) -> list[str]:
        """``tc -batch`` lines of the per-flow shaping (``per_flow``) on ``ifname``."""
        out = [f"qdisc replace dev {ifname} root handle 1: htb default 1000 r2q 100",
               f"class add dev {ifname} parent 1: classid 1:1000 htb rate 100gbit",  # not TCP: unshaped
               f"filter add dev {ifname} parent 1: prio 1 handle 2: protocol ip u32 divisor 256",
               # the TCP header right after a 20-byte IP header: source port's low byte
               f"filter add dev {ifname} parent 1: prio 1 protocol ip u32 ht 800:: match ip protocol 6 0xff "
               "hashkey mask 0x00ff0000 at 20 link 2:"]
        for i in range(256):
            out.append(f"class add dev {ifname} parent 1: classid 1:{i + 1:x} htb rate {self.rate_bps}bit "
                       f"burst {self.burst_bytes}")
            out.append(f"filter add dev {ifname} parent 1: prio 1 protocol ip u32 ht 2:{i:x}: match u8 0 0 "
                       f"flowid 1:{i + 1:x}")
        return out

    def tc_args(self) -> list[str]:
        return ["tbf", "rate", f"{self.rate_bps}bit", "burst", str(self.burst_bytes),
                "latency", f"{max(1, int(self.latency * 1e6))}us"]


@dataclass
class Link:
    """A veth pair between hosts ``a`` and ``b`` (names as given to the Testbed)."""

    a: str
    b: str
    index: int
    shape: LinkShape | None = None  # a -> b
    shape_back: LinkShape | None = None  # b -> a

    @property
    def ifname(self) -> str:
        return f"veth{self.index}"  # the same name on both ends, each in its own namespace

    def address(self, host: str) -> str:
        if host == self.a:
            return f"{SUBNET}.{self.index}.1"
        if host == self.b:
            return f"{SUBNET}.{self.index}.2"
        raise KeyError(f"host {host!r} is not on link {self.a}-{self.b}")


def _run(args: list[str], check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30, input=input)
    except FileNotFoundError as e:
        hint = ": install iproute2" if args[0] in ("ip", "tc") else ""
        raise TestbedUnavailable(f"{args[0]!r} not found{hint}") from e
    except subprocess.TimeoutExpired as e:
        raise TestbedError(f"{' '.join(args)}: no answer in 30 s") from e
    if check and r.returncode != 0:
        raise TestbedError(f"{' '.join(args)}: {r.stderr.strip() or f'exit code {r.returncode}'}")
    return r


def check_available(shaping: bool = False) -> None:
    """Raise TestbedUnavailable with the reason if namespaces cannot be made here."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise TestbedUnavailable("network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    for tool in ("ip",) + (("tc",) if shaping else ()):
        if shutil.which(tool) is None:
            raise TestbedUnavailable(f"{tool!r} not found in PATH: install iproute2")
    if _libc_setns() is None:
        raise TestbedUnavailable("libc has no setns()")


def unavailable_reason(shaping: bool = True) -> str | None:
    """Why namespaces (and tbf, with ``shaping``) cannot be used here, or None if they can.
    Tries for real: creates and deletes a namespace with a shaped veth link."""
    try:
        with Testbed(shape=LinkShape() if shaping else None):
            pass
    except TestbedUnavailable as e:
        return str(e)
    return None


def _libc_setns():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return getattr(libc, "setns", None)


def enter_netns(name: str | None) -> None:
    """Move the calling thread into network namespace ``name`` (a name under /var/run/netns
    or a path). None does nothing. Call it before creating sockets or threads."""
    if not name:
        return
    path = name if name.startswith("/") else os.path.join(NETNS_DIR, name)
    setns = _libc_setns()
    if setns is None:
        raise OSError("libc has no setns()")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}, CLONE_NEWNET): {os.strerror(err)}")
    finally:
        os.close(fd)


def list_namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(all_: bool = False) -> list[str]:
    """Delete ``ferry-<pid>-*`` namespaces whose creating process is gone (or every
    ``ferry-*`` namespace with ``all_``: only when no other run may be using them).
    Returns the names deleted."""
    gone = []
    for name in list_namespaces():
        if not name.startswith(PREFIX):
            continue
        m = re.match(rf"{re.escape(PREFIX)}(\d+)-", name)
        if not all_ and m and _pid_alive(int(m.group(1))):
            continue
        if not all_ and not m:
            continue
        if _run(["ip", "netns", "del", name], check=False).returncode == 0:
            gone.append(name)
    return gone


@dataclass
class Testbed:
    """Namespaces for ``hosts`` joined by ``links`` ((host, host) pairs); a context manager.

    ``shape`` is applied to both directions of every link unless a link is given as
    (a, b, shape_a_to_b, shape_b_to_a). Default: two hosts "a" and "b", one link.
    Only hosts that share a link reach each other (no routing or forwarding is set up).
    """

    __test__ = False  # not a pytest test class

    hosts: tuple[str, ...] = ("a", "b")
    links: list = field(default_factory=lambda: [("a", "b")])
    shape: LinkShape | None = None
    mtu: int = 1500
    ns: dict[str, str] = field(default_factory=dict, init=False)  # host -> namespace name
    link_objs: list[Link] = field(default_factory=list, init=False)

    def __post_init__(self):
        for h in self.hosts:
            if not re.fullmatch(r"[A-Za-z0-9_]{1,20}", h):
                raise ValueError(f"host name {h!r}: letters, digits and _ only, at most 20")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValueError(f"host names not unique: {self.hosts}")
        if len(self.links) > 250:
            raise ValueError("at most 250 links")
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_seq)}-"
        for i, spec in enumerate(self.links):
            a, b = spec[0], spec[1]
            for h in (a, b):
                if h not in self.hosts:
                    raise ValueError(f"link {a}-{b}: unknown host {h!r}")
            fwd = spec[2] if len(spec) > 2 else self.shape
            back = spec[3] if len(spec) > 3 else (fwd if len(spec) > 2 else self.shape)
            self.link_objs.append(Link(a, b, i + 1, fwd, back))

    # --- lifecycle ---
    def __enter__(self) -> "Testbed":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def setup(self) -> None:
        shaping = any(lk.shape or lk.shape_back for lk in self.link_objs)
        check_available(shaping)
        try:
            for h in self.hosts:
                name = self.prefix + h
                r = _run(["ip", "netns", "add", name], check=False)
                if r.returncode != 0:
                    msg = r.stderr.strip()
                    if not self.ns:  # the very first one: namespaces are not possible here
                        raise TestbedUnavailable(f"cannot create a network namespace: {msg}")
                    raise TestbedError(f"ip netns add {name}: {msg}")
                self.ns[h] = name
                _run(["ip", "-n", name, "link", "set", "lo", "up"])
            for lk in self.link_objs:
                na, nb = self.ns[lk.a], self.ns[lk.b]
                _run(["ip", "link", "add", lk.ifname, "netns", na, "mtu", str(self.mtu), "type", "veth",
                      "peer", "name", lk.ifname, "netns", nb, "mtu", str(self.mtu)])
                for host, shape in ((lk.a, lk.shape), (lk.b, lk.shape_back)):
                    n = self.ns[host]
                    _run(["ip", "-n", n, "addr", "add", f"{lk.address(host)}/24", "dev", lk.ifname])
                    _run(["ip", "-n", n, "link", "set", lk.ifname, "up"])
                    if shape is not None and shape.per_flow:
                        r = _run(["tc", "-n", n, "-force", "-batch", "-"], check=False,
                                 input="\n".join(shape.tc_batch(lk.ifname)) + "\n")
                        if r.returncode != 0:
                            raise TestbedUnavailable(f"tc htb/u32 per-flow shaping not available: {r.stderr.strip()}")
                    elif shape is not None:
                        r = _run(["tc", "-n", n, "qdisc", "replace", "dev", lk.ifname, "root", *shape.tc_args()],
                                 check=False)
                        if r.returncode != 0:
                            raise TestbedUnavailable(f"tc qdisc tbf not available: {r.stderr.strip()}")
        except BaseException:
            try:
                self.teardown()
            except TestbedError:
                pass  # the setup error is the one to report
            raise

    def teardown(self) -> None:
        """Delete every namespace this testbed created (their veths and qdiscs go with them)."""
        errors = []
        for h, name in list(self.ns.items()):
            r = _run(["ip", "netns", "del", name], check=False)
            if r.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, name)):
                errors.append(f"ip netns del {name}: {r.stderr.strip()}")
            else:
                del self.ns[h]
        if errors:
            raise TestbedError("; ".join(errors))

    # --- queries ---
    def link(self, a: str, b: str) -> Link:
        for lk in self.link_objs:
            if {lk.a, lk.b} == {a, b}:
                return lk
        raise KeyError(f"no link between {a!r} and {b!r}")

    def address(self, host: str, peer: str | None = None) -> str:
        """``host``'s address on its link to ``peer`` (default: its first link)."""
        for lk in self.link_objs:
            if host in (lk.a, lk.b) and (peer is None or peer in (lk.a, lk.b)):
                return lk.address(host)
        raise KeyError(f"host {host!r} has no link" + (f" to {peer!r}" if peer else ""))

    def namespaces(self) -> list[str]:
        return list(self.ns.values())

    def exec(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside ``host``'s namespace (``ip netns exec``)."""
        return _run(["ip", "netns", "exec", self.ns[host], *args], check=check)

    def sysctl(self, host: str, *names: str) -> dict[str, str]:
        """Read sysctls as seen inside ``host``'s namespace."""
        out = {}
        for n in names:
            path = "/proc/sys/" + n.replace(".", "/")
            try:
                r = self.exec(host, "cat", path, check=False)
            except TestbedError:
                out[n] = None
                continue
            out[n] = " ".join(r.stdout.split()) if r.returncode == 0 else None
        return out

    def qdisc_stats(self, host: str, peer: str) -> str:
        lk = self.link(host, peer)
        return _run(["tc", "-s", "-n", self.ns[host], "qdisc", "show", "dev", lk.ifname]).stdout


def namespace_address(name: str) -> str:
    """The first global IPv4 address inside namespace ``name``."""
    r = _run(["ip", "-n", name, "-4", "-o", "addr", "show", "scope", "global"])
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", r.stdout)
    if not m:
        raise TestbedError(f"namespace {name}: no global IPv4 address")
    return m.group(1)


# --- measuring a link: RTT and rate between two processes --------------------------

def _echo(s: socket.socket) -> None:
    buf = bytearray(256)
    try:
        while True:
            n = s.recv_into(buf)
            if n == 0:
                break
            s.sendall(buf[:n])
    except OSError:
        pass
    finally:
        s.close()


def _probe_server(conn, ns: str | None, host: str) -> None:
    """Echo on the first connection (in a thread); count bytes of the second until EOF."""
    import threading

    try:
        enter_netns(ns)
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind((host, 0))
        srv.listen(2)
        conn.send(("listening", srv.getsockname()[1]))
        srv.settimeout(60)
        s, _ = srv.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        echo = threading.Thread(target=_echo, args=(s,), daemon=True)
        echo.start()
        b, _ = srv.accept()
        big = memoryview(bytearray(4 << 20))
        got = first = 0
        t0 = t1 = None
        while True:
            n = b.recv_into(big)
            if n == 0:
                break
            t1 = time.monotonic()
            if t0 is None:
                t0, first = t1, n
            got += n
        # Rate: bytes after the first read, over first -> last read.
        b.sendall(struct.pack("!Qd", got - first, (t1 - t0) if t0 else 0.0))
        b.close()
        echo.join(30)
        conn.send(("done", got))
    except Exception as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _ping(s: socket.socket, out: bytes, buf: bytearray) -> float:
    t0 = time.perf_counter()
    s.sendall(out)
    got = 0
    while got < len(out):
        n = s.recv_into(memoryview(buf)[got:])
        if n == 0:
            raise ConnectionError("echo server closed")
        got += n
    return time.perf_counter() - t0


def _probe_client(conn, ns: str | None, host: str, port: int, pings: int, msg: int, seconds: float) -> None:
    """Pings on an idle link, then a bulk push for ``seconds`` with pings beside it."""
    import threading

    try:
        enter_netns(ns)
        p = socket.create_connection((host, port), timeout=30)
        p.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out, buf = b"p" * msg, bytearray(msg)
        idle = [_ping(p, out, buf) for _ in range(pings)]
        b = socket.create_connection((host, port), timeout=30)
        stop = threading.Event()
        err = []

        def push():
            chunk = memoryview(os.urandom(1 << 20))
            try:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    b.sendall(chunk)
                b.shutdown(socket.SHUT_WR)
            except OSError as e:
                err.append(e)
            finally:
                stop.set()

        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        time.sleep(min(0.2, seconds / 4))  # past slow start
        loaded = []
        while not stop.is_set():
            loaded.append(_ping(p, out, buf))
            time.sleep(0.001)
        pusher.join()
        if err:
            raise err[0]
        p.close()
        hdr = b""
        while len(hdr) < 16:
            d = b.recv(16 - len(hdr))
            if not d:
                raise ConnectionError("bulk receiver closed without its count")
            hdr += d
        got, dt = struct.unpack("!Qd", hdr)
        b.close()
        conn.send(("done", (idle, loaded, got, dt)))
    except Exception as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _us_summary(seconds: list[float]) -> dict:
    import numpy as np

    if not seconds:
        return {"count": 0}
    us = np.asarray(seconds) * 1e6
    p50, p99 = np.percentile(us, [50, 99])
    return {"p50": round(float(p50), 1), "p99": round(float(p99), 1), "avg": round(float(us.mean()), 1),
            "min": round(float(us.min()), 1), "max": round(float(us.max()), 1), "count": len(us)}


def probe_link(client_ns: str | None, server_ns: str | None, server_host: str,
               pings: int = 2000, msg: int = 32, seconds: float = 1.0, timeout: float = 60.0) -> dict:
    """Measure the path from a process in ``client_ns`` to one in ``server_ns`` (listening on
    ``server_host``; None = this namespace, i.e. loopback), both processes spawned:

    - ``rtt-us``: TCP ping-pong of ``msg``-byte messages on an idle link;
    - ``rate-Bps``: goodput of a bulk push for ``seconds`` (TCP payload bytes/s, as the
      receiver counts them);
    - ``loaded-rtt-us``: the same ping-pong on its own connection while the bulk push
      runs (what a shared queue adds).
    """
    ctx = mp.get_context("spawn")
    sp, sc = ctx.Pipe()
    cp, cc = ctx.Pipe()
    server = ctx.Process(target=_probe_server, args=(sc, server_ns, server_host), daemon=True,
                         name="ferry-probe-server")
    client = None
    try:
        server.start()
        port = _recv(sp, server, "probe server", timeout)
        client = ctx.Process(target=_probe_client, args=(cc, client_ns, server_host, port, pings, msg, seconds),
                             daemon=True, name="ferry-probe-client")
        client.start()
        idle, loaded, got, dt = _recv(cp, client, "probe client", timeout + seconds)
        _recv(sp, server, "probe server", 10)
        return {"rtt-us": _us_summary(idle), "rate-Bps": round(got / dt) if dt > 0 else 0,
                "loaded-rtt-us": _us_summary(loaded), "bulk-bytes": got, "bulk-seconds": round(dt, 4)}
    finally:
        for p in (client, server):
            if p is not None and p.pid is not None:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)


def _recv(conn, proc, what: str, timeout: float):
    end = time.monotonic() + timeout
    while not conn.poll(0.2):
        if not proc.is_alive() and not conn.poll(0):
            raise TestbedError(f"{what}: exited with code {proc.exitcode} before answering")
        if time.monotonic() > end:
            raise TestbedError(f"{what}: no answer in {timeout:.0f} s")
    kind, val = conn.recv()
    if kind == "error":
        raise TestbedError(f"{what}: {val}")
    return val
