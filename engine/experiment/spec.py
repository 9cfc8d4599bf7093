"""Sweep files: what an experiment fixes, what it sweeps, how often it repeats.

A sweep file is TOML::

    name = "preempt-vs-vanilla"
    repeat = 3
    link = "loopback"            # loopback | netns | hosts

    [fixed]
    guest-size = "256M"
    workload-pattern = "random"
    capabilities = ["postcopy-ram"]
    switchover = "postcopy-after-percent:5"

    [sweep]
    page-size = ["4K", "2M"]
    postcopy-preempt = [false, true]

Every key is checked before anything runs; an unknown key, a wrong type or an
impossible combination is an error naming the key and its line in the file.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from ..params import CAPABILITIES, PARAMETERS, ParameterError, validate_parameter
from ..ram import parse_size
from ..workload import PATTERNS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

LINKS = ("loopback", "netns", "hosts")


class SpecError(ValueError):
    """A sweep file is wrong; the message names the key and the line."""


def _size(v) -> int:
    return parse_size(v)


def _rate(v) -> int:
    """Bits per second of a link: an integer, or tc-style ``100mbit``/``1gbit`` (``125mbps`` is
    bytes/s), or a number with K/M/G (decimal, as rates are: 1G = 10^9 bit/s)."""
    from ..testbed import parse_rate

    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError("expected bits/s: an integer or a string like 100mbit or 1gbit")
    if isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgG])\s*", v)
        if m:
            v = int(float(m.group(1)) * {"k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()])
        else:
            v = parse_rate(v)
    if not 8000 <= v <= 100 * 10**9:
        raise ValueError(f"{v} bit/s: expected 8kbit..100gbit")
    return v


def _switchover(v) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    if v == "precopy":
        return v
    kind, sep, arg = v.partition(":")
    if kind not in ("postcopy-after-passes", "postcopy-after-percent", "postcopy-after-seconds") or not sep:
        raise ValueError("expected precopy, postcopy-after-passes:N, postcopy-after-percent:P "
                         "or postcopy-after-seconds:S")
    float(arg)
    return v


def _choice(options):
    def check(v):
        if v not in options:
            raise ValueError(f"expected one of {', '.join(map(str, options))}")
        return v
    return check


def _typed(kind, lo=None, hi=None):
    def check(v):
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            raise ValueError(f"expected {kind.__name__}")
        if lo is not None and not lo <= v <= hi:
            raise ValueError(f"expected {lo}..{hi}")
        return v
    return check


def _caps(v):
    if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
        raise ValueError("expected a list of capability names")
    for c in v:
        if c not in CAPABILITIES:
            raise ValueError(f"unknown capability {c!r}")
    return v


# Settings a run takes besides migration parameters (which use QEMU's names).
SETTINGS = {
    "guest-size": _size,
    "page-size": lambda v: _choice((4096, 2 << 20, 1 << 30))(_size(v)),
    "backing": _choice(("anon", "memfd", "hugetlb")),
    # Where each worker's guest runs: in the worker, or a process of its own (userfaultfd).
    "guest": _choice(("in-process", "process")),
    "blocks": _typed(int, 1, 64),
    "fill": _choice(("zero", "pattern", "random", "mixed")),
    "transport": _choice(("tcp", "unix")),
    "link-rate": _rate,  # bits/s of the netns link (tbf): 1gbit, 100mbit, or an integer
    "capabilities": _caps,
    "switchover": _switchover,
    "workload-threads": _typed(int, 0, 64),
    "workload-pattern": _choice(PATTERNS),
    "workload-dirty-rate": _size,
    "workload-hot-fraction": _typed(float, 0.0, 1.0),
    "workload-write-ratio": _typed(float, 0.0, 1.0),
    "workload-zipf-a": _typed(float, 1.0001, 100.0),
    "workload-batch": _typed(int, 1, 4096),
    "dest-workload-threads": _typed(int, 0, 64),
    "dest-workload-pattern": _choice(PATTERNS),
    "dest-workload-dirty-rate": _size,
    "dest-workload-batch": _typed(int, 1, 4096),
    "timeout": _typed(float, 1.0, 3600.0),
    # s the guest runs before migrate, and after the end before the runner reads
    # the progress series: the plots show it before and after the migration.
    "warmup": _typed(float, 0.0, 600.0),
    "cooldown": _typed(float, 0.0, 600.0),
}
# A capability may also be swept on its own as a boolean key.
BOOL_CAPS = {c for c in CAPABILITIES}
TOP_KEYS = {"name", "repeat", "link", "description", "fixed", "sweep", "hosts"}
# Settings that shape or fill the guest, or its workload: with link "hosts" the
# guests are those of workers already running, so a sweep cannot change them.
GUEST_KEYS = ("guest-size", "page-size", "backing", "guest", "blocks", "fill", "workload-threads", "workload-pattern",
              "workload-dirty-rate", "workload-hot-fraction", "workload-write-ratio", "workload-zipf-a",
              "workload-batch", "dest-workload-threads", "dest-workload-pattern", "dest-workload-dirty-rate",
              "dest-workload-batch")
# [hosts] keys: control endpoints of running workers, their CURVE keys, where the
# destination listens, and how long to wait for (restarted) workers to be ready.
HOSTS_KEYS = ("source", "destination", "curve-dir", "uri", "wait", "quit-after-run")


@dataclass
class Spec:
    """A validated sweep: fixed settings, swept settings, repeats."""

    name: str
    repeat: int
    link: str
    fixed: dict
    sweep: dict  # key -> list of values, in file order
    hosts: dict = field(default_factory=dict)
    description: str = ""

    def combinations(self) -> list[dict]:
        """Every combination of the swept values, with the fixed ones, in file order."""
        keys = list(self.sweep)
        out = []
        for values in itertools.product(*(self.sweep[k] for k in keys)):
            out.append({**self.fixed, **dict(zip(keys, values))})
        return out

    def to_dict(self) -> dict:
        """The validated sweep as plain data (what DIR/sweep.json records)."""
        return {"name": self.name, "description": self.description, "repeat": self.repeat, "link": self.link,
                "fixed": dict(self.fixed), "sweep": {k: list(v) for k, v in self.sweep.items()},
                "hosts": dict(self.hosts)}

    def runs(self) -> list[tuple[str, dict, int]]:
        """(run id, settings, repeat index) for every run of the sweep."""
        out = []
        for i, settings in enumerate(self.combinations()):
            for r in range(self.repeat):
                out.append((f"c{i:03d}-r{r}", settings, r))
        return out


def _line_of(text: str, key: str, section: str | None) -> int:
    """The line of ``key`` in the file (in ``section`` when given), 1-based; 0 if not found."""
    cur = None
    pat = re.compile(r'^\s*("?)' + re.escape(key) + r'\1\s*=')
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*\[([^\]]+)\]", line)
        if m:
            cur = m.group(1).strip()
            continue
        if pat.match(line) and (section is None or cur == section):
            return n
    return 0


def check_setting(key: str, value):
    """Validate one setting (or migration parameter); returns the normalised value."""
    if key in SETTINGS:
        return SETTINGS[key](value)
    if key in BOOL_CAPS:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if key in PARAMETERS:
        if isinstance(value, str) and PARAMETERS[key].kind is int:
            value = parse_size(value)
        try:
            return validate_parameter(key, value)
        except ParameterError as e:
            raise ValueError(str(e)) from None
    raise KeyError(key)


def run_capabilities(settings: dict) -> dict:
    """The capabilities one run sets: the list, then single boolean keys."""
    caps = {c: True for c in settings.get("capabilities", [])}
    for k, v in settings.items():
        if k in BOOL_CAPS:
            caps[k] = v
    return caps


def run_parameters(settings: dict) -> dict:
    """The migration parameters one run sets, including the switchover policy."""
    params = {k: v for k, v in settings.items() if k in PARAMETERS}
    sw = settings.get("switchover", "precopy")
    kind, _, arg = sw.partition(":")
    if kind == "postcopy-after-passes":
        params["postcopy-after-passes"] = int(arg)
    elif kind == "postcopy-after-percent":
        params["postcopy-after-percent"] = int(float(arg))
    return params


def _check_combination(settings: dict) -> str | None:
    caps = run_capabilities(settings)
    sw = settings.get("switchover", "precopy")
    if caps.get("postcopy-preempt") and not caps.get("postcopy-ram"):
        return "postcopy-preempt needs postcopy-ram"
    if sw != "precopy" and not caps.get("postcopy-ram"):
        return f"switchover {sw!r} needs the postcopy-ram capability"
    if settings.get("backing") == "hugetlb" and settings.get("page-size", 4096) == 4096:
        return "backing 'hugetlb' needs page-size 2M or 1G"
    size, ps = settings.get("guest-size", 256 << 20), settings.get("page-size", 4096)
    if size % (ps * settings.get("blocks", 1)):
        return f"guest-size {size} is not a multiple of page-size {ps} x blocks"
    return None


def parse_spec(text: str, path: str = "<sweep>") -> Spec:
    """Parse and validate a sweep file's text; SpecError names the key and line."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None

    def err(msg: str, key: str, section: str | None = None) -> SpecError:
        line = _line_of(text, key, section)
        where = f"{path}:{line}" if line else path
        return SpecError(f"{where}: {msg}")

    for k in doc:
        if k not in TOP_KEYS:
            raise err(f"unknown key {k!r} (top level: {', '.join(sorted(TOP_KEYS))})", k)
    name = doc.get("name", path.rsplit("/", 1)[-1].removesuffix(".toml"))
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        # It names the results directory and goes into every record.
        raise err(f"name {name!r}: expected letters, digits, '.', '_' or '-' (at most 64)", "name")
    if not isinstance(doc.get("description", ""), str):
        raise err("description: expected a string", "description")
    repeat = doc.get("repeat", 1)
    if not isinstance(repeat, int) or isinstance(repeat, bool) or not 1 <= repeat <= 1000:
        raise err(f"repeat {repeat!r}: expected a whole number 1..1000", "repeat")
    link = doc.get("link", "loopback")
    if link not in LINKS:
        raise err(f"link {link!r}: expected one of {', '.join(LINKS)}", "link")
    hosts = doc.get("hosts", {})
    if not isinstance(hosts, dict):
        raise err("[hosts] must be a table", "hosts")
    if hosts and link != "hosts":
        raise err(f"[hosts] is only used with link = \"hosts\" (this sweep's link is {link!r})", "link")
    if link == "hosts":
        for role in ("source", "destination"):
            if not isinstance(hosts.get(role), str):
                raise err(f"link 'hosts' needs [hosts] {role} = \"tcp://HOST:PORT\" (a control endpoint)",
                          "link")
        _check_hosts(hosts, lambda msg, key: err(msg, key, "hosts"))
    fixed, sweep = {}, {}
    for section, target in (("fixed", fixed), ("sweep", sweep)):
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise err(f"[{section}] must be a table", section)
        for k, v in table.items():
            if section == "sweep":
                if not isinstance(v, list) or not v:
                    raise err(f"[sweep] {k}: expected a non-empty list of values", k, section)
                values = v
            else:
                values = [v]
            checked = []
            for one in values:
                try:
                    checked.append(check_setting(k, one))
                except KeyError:
                    raise err(f"unknown key {k!r} in [{section}] (a setting, a capability, or a "
                              f"migration parameter; see docs/experiments.md)", k, section) from None
                except ValueError as e:
                    raise err(f"{k} = {one!r}: {e}", k, section) from None
            target[k] = checked if section == "sweep" else checked[0]
    for k in list(fixed) + list(sweep):
        section = "fixed" if k in fixed else "sweep"
        if link == "hosts" and k in GUEST_KEYS:
            raise err(f"{k!r} changes the guest, which link 'hosts' cannot: the guests are those of the "
                      "workers already running at [hosts] (start them with the guest options you want, "
                      "or use link = \"loopback\" or \"netns\")", k, section)
        if k == "link-rate" and link != "netns":
            raise err(f"link-rate shapes the link of a netns testbed; this sweep's link is {link!r} "
                      "(use link = \"netns\")", k, section)
        if k == "transport" and link != "loopback" and "unix" in ([fixed[k]] if k in fixed else sweep[k]):
            raise err(f"transport 'unix' is a socket file on one host: with link {link!r} the stream "
                      "must cross the link (use tcp)", k, section)
    both = set(fixed) & set(sweep)
    if both:
        k = sorted(both)[0]
        raise err(f"{k!r} is both fixed and swept", k, "sweep")
    spec = Spec(name, repeat, link, fixed, sweep, hosts, doc.get("description", ""))
    for settings in spec.combinations():
        problem = _check_combination(settings)
        if problem:
            swept = {k: settings[k] for k in sweep}
            key = next((k for k in ("capabilities", "postcopy-preempt", "switchover", "backing", "guest-size")
                        if k in settings), "fixed")
            section = "sweep" if key in sweep else "fixed"
            raise err(f"impossible combination {swept}: {problem}", key, section)
    return spec


def _check_hosts(hosts: dict, err) -> None:
    """[hosts] keys and their types; ``err(message, key)`` builds the SpecError."""
    from ..control import endpoints

    for k, v in hosts.items():
        if k not in HOSTS_KEYS:
            raise err(f"unknown key {k!r} in [hosts] (known: {', '.join(HOSTS_KEYS)})", k)
        if k in ("source", "destination"):
            try:
                endpoints.check(v)
            except endpoints.EndpointError as e:
                raise err(f"[hosts] {k}: {e}", k) from None
        elif k in ("curve-dir", "uri") and not isinstance(v, str):
            raise err(f"[hosts] {k}: expected a string", k)
        elif k == "wait" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 3600):
            raise err(f"[hosts] wait = {v!r}: expected seconds, 0..3600", k)
        elif k == "quit-after-run" and not isinstance(v, bool):
            raise err(f"[hosts] quit-after-run = {v!r}: expected true or false", k)
    if "uri" in hosts:
        from ferry_migrate.channels.transport import parse_uri

        try:
            parse_uri(hosts["uri"])
        except ValueError as e:
            raise err(f"[hosts] uri: {e}", "uri") from None


def load_spec(path: str) -> Spec:
    with open(path, encoding="utf-8") as f:
        return parse_spec(f.read(), path)
