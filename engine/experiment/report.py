"""``ferry experiment report DIR``: CSV summaries, plots and a report page of an experiment.

Reads what ``ferry experiment run`` wrote (DIR/sweep.json, DIR/runs/*.json)
and writes into DIR/report (or --out):

- runs.csv: one row per run (its swept settings, status, headline figures,
  bytes per channel);
- summary.csv: one row per configuration, mean/min/max over its completed
  repeats;
- PNG figures (see engine/experiment/plots.py);
- report.md and report.html: the experiment, the table of configurations, each
  figure with what it shows, and the runs that did not complete with their
  errors. The HTML page is self-contained apart from the PNGs beside it.

The pages are built once as a list of blocks and rendered twice, so the
markdown and HTML pages never say different things.
"""
from __future__ import annotations

import argparse
import csv
import html
import os
import sys

from .records import Configuration, Experiment, ReportError, aggregate, channel_bytes, csv_value, \
    format_epoch, format_setting, load_experiment, run_metrics

__all__ = ["ReportError", "write_report", "add_report_parser", "cmd_report"]

FORMATS = ("md", "html")
# Columns of runs.csv after the identity, settings and status columns (see run_metrics).
RUN_COLUMNS = ("total-time-ms", "setup-time-ms", "downtime-ms", "transferred-bytes", "precopy-bytes",
               "postcopy-bytes", "passes", "mbps", "postcopy-requests", "latency-count", "latency-avg-us",
               "latency-p50-us", "latency-p90-us", "latency-p99-us", "latency-max-us", "blocktime-ms",
               "preemptions", "restores", "source-cpu-s", "destination-cpu-s", "wall-time-s")
# Figures summary.csv aggregates over repeats.
SUMMARY_METRICS = ("total-time-ms", "downtime-ms", "transferred-bytes", "mbps", "passes", "postcopy-requests",
                   "latency-avg-us", "latency-p50-us", "latency-p99-us", "latency-max-us", "blocktime-ms",
                   "preemptions", "restores")
# The configuration table of the pages: (metric, heading, divisor).
TABLE_METRICS = (("total-time-ms", "total time (ms)", 1), ("downtime-ms", "downtime (ms)", 1),
                 ("transferred-bytes", "sent (MiB)", 1 << 20), ("mbps", "Mbit/s", 1),
                 ("postcopy-requests", "requests", 1), ("latency-p50-us", "latency p50 (µs)", 1),
                 ("latency-p99-us", "latency p99 (µs)", 1), ("blocktime-ms", "blocktime (ms)", 1),
                 ("preemptions", "preemptions", 1))
EXIT_OK, EXIT_BAD_INPUT = 0, 2  # as engine/cli.py's EXIT_OK and EXIT_USAGE


# --- CSV ---------------------------------------------------------------------------

def _channels(exp: Experiment) -> list[str]:
    seen: list[str] = []
    for r in exp.runs:
        for ch in channel_bytes(r):
            if ch not in seen:
                seen.append(ch)
    return sorted(seen, key=lambda ch: (ch != "precopy", ch))


def run_rows(exp: Experiment) -> tuple[list[str], list[dict]]:
    """The columns and rows of runs.csv."""
    chans = _channels(exp)
    cols = ["run", "combination", "repeat", *exp.swept_keys, "status", "error", *RUN_COLUMNS,
            *(f"bytes-{ch}" for ch in chans)]
    rows = []
    for r in exp.runs:
        m = run_metrics(r)
        b = channel_bytes(r)
        row = {"run": r.id, "combination": r.combination, "repeat": r.repeat,
               **{k: r.settings.get(k) for k in exp.swept_keys}, "status": r.status,
               "error": None if r.completed else r.error, **{k: m[k] for k in RUN_COLUMNS},
               **{f"bytes-{ch}": b.get(ch) for ch in chans}}
        rows.append(row)
    return cols, rows


def summary_rows(exp: Experiment) -> tuple[list[str], list[dict]]:
    """The columns and rows of summary.csv: per configuration, mean/min/max over completed repeats."""
    chans = _channels(exp)
    metrics = [*SUMMARY_METRICS, *(f"bytes-{ch}" for ch in chans)]
    cols = ["combination", "configuration", *exp.swept_keys, "runs", "completed", "failed"]
    for m in metrics:
        cols += [f"{m}-mean", f"{m}-min", f"{m}-max"]
    rows = []
    for c in exp.configs:
        ms = [run_metrics(r) | {f"bytes-{ch}": channel_bytes(r).get(ch) for ch in chans} for r in c.completed]
        row = {"combination": c.index, "configuration": c.label, **c.settings, "runs": len(c.runs),
               "completed": len(c.completed), "failed": len(c.runs) - len(c.completed)}
        for m in metrics:
            a = aggregate([x[m] for x in ms])
            for k in ("mean", "min", "max"):
                row[f"{m}-{k}"] = a[k]
        rows.append(row)
    return cols, rows


def _write_csv(path: str, cols: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for row in rows:
            w.writerow({k: csv_value(row.get(k)) for k in cols})


# --- the page, as blocks -------------------------------------------------------------

def _num(v) -> str:
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _cell(c: Configuration, key: str, scale: float) -> str:
    a = aggregate([run_metrics(r)[key] for r in c.completed])
    if a["mean"] is None:
        return "–"
    s = _num(a["mean"] / scale)
    lo, hi = _num(a["min"] / scale), _num(a["max"] / scale)
    if a["n"] > 1 and lo != hi:  # a range that reads "20 (20–20)" says nothing
        s += f" ({lo}–{hi})"
    return s


def _blocks(exp: Experiment, plots: list, files: list[str]) -> list[tuple]:
    """The report as a list of blocks: (h1|h2|h3|p, text), (list, items), (table, head, rows),
    (figure, file, title, caption), (code, text)."""
    meta = exp.meta
    ok = sum(r.completed for r in exp.runs)
    b: list[tuple] = [("h1", f"Experiment report: {exp.name}")]
    facts = [f"Sweep file: {meta.get('file') or '–'}",
             f"Started: {format_epoch(meta.get('started'))}",
             f"Runs: {len(exp.runs)} recorded, {ok} completed, {len(exp.runs) - ok} did not complete"
             + (f", {len(exp.missing)} not recorded" if exp.missing else ""),
             f"Configurations: {len(exp.configs)}, repeated {meta.get('repeat', '–')} time(s) each",
             f"Link: {_link_text(exp)}"]
    if meta.get("fixed"):
        facts.append("Fixed settings: " + ", ".join(f"{k}={format_setting(k, v)}" for k, v in meta["fixed"].items()))
    if meta["sweep"]:
        facts.append("Swept settings: " + "; ".join(
            f"{k} over {', '.join(format_setting(k, v) for v in vs)}" for k, vs in meta["sweep"].items()))
    b.append(("list", facts))

    b.append(("h2", "Configurations"))
    b.append(("p", "One row per combination of the swept settings. Figures are means over the completed "
                   "repeats, with the range (fastest–slowest) when repeats differ; – means the figure does "
                   "not apply (e.g. no postcopy request in a precopy run) or no repeat completed."))
    head = ["#", *exp.swept_keys, "completed", *(h for _, h, _ in TABLE_METRICS)]
    rows = []
    for c in exp.configs:
        rows.append([c.name, *(format_setting(k, v) for k, v in c.settings.items()),
                     f"{len(c.completed)}/{len(c.runs)}", *(_cell(c, k, s) for k, _, s in TABLE_METRICS)])
    b.append(("table", head, rows))

    b.append(("h2", "Figures"))
    if not plots:
        b.append(("p", "No figure: no run completed."))
    for p in plots:
        b.append(("h3", p.title))
        b.append(("figure", p.file, p.title, p.caption))

    b.append(("h2", "Runs that did not complete"))
    if exp.failed:
        b.append(("table", ["run", "configuration", "status", "error"],
                  [[r.id, _config_of(exp, r).label, r.status, r.error or "(no error recorded)"]
                   for r in exp.failed]))
    else:
        b.append(("p", "None: every recorded run completed."))
    if exp.missing:
        b.append(("p", f"Not recorded ({len(exp.missing)}): {', '.join(exp.missing)}. The experiment was "
                       "interrupted or is still running; the figures above leave these runs out."))

    b.append(("h2", "Files"))
    titles = {p.file: f"figure, {p.title}" for p in plots}
    b.append(("list", [f"{f}: {_FILE_DOC.get(f) or titles[f]}" for f in files]))
    if meta.get("text"):
        b.append(("h2", "Sweep file"))
        b.append(("code", meta["text"]))
    return b


_FILE_DOC = {
    "runs.csv": "one row per run: swept settings, status, error, times, bytes, request latency, "
                "preemptions, bytes per channel",
    "summary.csv": "one row per configuration: mean, min and max over its completed repeats",
}


def _config_of(exp: Experiment, run) -> Configuration:
    return next(c for c in exp.configs if c.index == run.combination)


def _link_text(exp: Experiment) -> str:
    """The link kind, with each shaped rate and what the runner measured on it (netns)."""
    kind = exp.meta.get("link") or "–"
    seen: dict = {}
    for r in exp.runs:
        link = r.data.get("link") or {}
        if link.get("rate-bps") is not None or link.get("probe"):
            seen.setdefault((link.get("rate-bps"), bool(link.get("per-flow"))), link.get("probe") or {})
    parts = []
    for (rate, per_flow), probe in seen.items():
        text = (f"shaped to {format_setting('link-rate', rate)}{' per flow' if per_flow else ''}"
                if rate else "not shaped")
        measured = []
        if isinstance(probe.get("rate-Bps"), (int, float)):
            measured.append(f"{probe['rate-Bps'] * 8 / 1e6:.4g} Mbit/s")
        if isinstance(probe.get("rtt-us"), (int, float)):
            measured.append(f"RTT {probe['rtt-us'] / 1000:.3g} ms idle")
        if isinstance(probe.get("loaded-rtt-us"), (int, float)):
            measured.append(f"{probe['loaded-rtt-us'] / 1000:.3g} ms loaded")
        if measured:
            text += " (measured: " + ", ".join(measured) + ")"
        parts.append(text)
    return kind + (": " + "; ".join(parts) if parts else "")


# --- rendering ------------------------------------------------------------------------

def _md_text(s) -> str:
    # Errors and settings may hold <...>: a markdown renderer would take it for an HTML tag.
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _md_cell(s) -> str:
    return _md_text(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + _md_text(blk[1]))
        elif kind == "p":
            out.append(_md_text(blk[1]))
        elif kind == "list":
            out.append("\n".join(f"- {_md_text(item)}" for item in blk[1]))
        elif kind == "table":
            head, rows = blk[1], blk[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |",
                     "|" + "|".join("---" for _ in head) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "figure":
            out.append(f"![{_md_text(blk[2])}]({blk[1]})\n\n{_md_text(blk[3])}")
        elif kind == "code":
            fence = "````" if "```" in blk[1] else "```"
            out.append(f"{fence}toml\n{blk[1].rstrip()}\n{fence}")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.err { font-family: ui-monospace, monospace; white-space: pre-wrap; color: #8a1c1c; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.92em; color: #444; max-width: 60em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def render_html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(blk[1])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in blk[1]) + "</ul>")
        elif kind == "table":
            head, rows = blk[1], blk[2]
            err_col = head.index("error") if "error" in head else -1
            t = ["<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
            for row in rows:
                t.append("<tr>" + "".join(
                    f'<td class="err">{e(str(c))}</td>' if i == err_col else f"<td>{e(str(c))}</td>"
                    for i, c in enumerate(row)) + "</tr>")
            t.append("</table>")
            out.append("\n".join(t))
        elif kind == "figure":
            out.append(f'<figure><img src="{e(blk[1])}" alt="{e(blk[2])}">'
                       f"<figcaption>{e(blk[3])}</figcaption></figure>")
        elif kind == "code":
            out.append(f"<details open><summary>sweep file</summary><pre>{e(blk[1])}</pre></details>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# --- entry points -----------------------------------------------------------------------

def write_report(dir: str, out: str | None = None, formats: tuple[str, ...] = FORMATS) -> list[str]:
    """Write the CSVs, the figures and the pages of the experiment in ``dir``; returns the files written.

    Raises ReportError (naming the file and what is wrong) for a directory or record it cannot read.
    """
    from .plots import write_plots

    exp = load_experiment(dir)
    out = out or os.path.join(dir, "report")
    os.makedirs(out, exist_ok=True)
    files = []
    for name, (cols, rows) in (("runs.csv", run_rows(exp)), ("summary.csv", summary_rows(exp))):
        _write_csv(os.path.join(out, name), cols, rows)
        files.append(name)
    plots = write_plots(exp, out)
    files += [p.file for p in plots]
    blocks = _blocks(exp, plots, files)
    pages = []
    if "md" in formats:
        with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
            f.write(render_markdown(blocks))
        pages.append("report.md")
    if "html" in formats:
        with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
            f.write(render_html(blocks, f"Experiment report: {exp.name}"))
        pages.append("report.html")
    return [os.path.join(out, f) for f in files + pages]


def _formats(text: str) -> tuple[str, ...]:
    got = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in got if f not in FORMATS]
    if bad or not got:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(FORMATS)}")
    return got


def cmd_report(args) -> int:
    try:
        written = write_report(args.dir, args.out, args.format)
    except ReportError as e:
        print(f"ferry experiment report: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {len(written)} files to {os.path.dirname(written[0])}:")
    for p in written:
        print(f"  {os.path.basename(p)}")
    return EXIT_OK


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``report`` to the ``ferry experiment`` subcommands."""
    p = subparsers.add_parser(
        "report", help="CSV summaries, plots and a report page of an experiment's runs",
        description="Read DIR/sweep.json and DIR/runs/*.json (written by `ferry experiment run --out DIR`) "
                    "and write runs.csv, summary.csv, PNG figures, report.md and report.html. "
                    "See docs/experiments.md, section Reports.")
    p.add_argument("dir", metavar="DIR", help="the --out directory of `ferry experiment run`")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default DIR/report)")
    p.add_argument("--format", type=_formats, default=FORMATS, metavar="md,html",
                   help="which pages to write (default both); the CSVs and PNGs are always written")
    p.set_defaults(func=cmd_report)
    return p
