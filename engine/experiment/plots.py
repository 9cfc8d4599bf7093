"""The report's figures: matplotlib on the Agg canvas, written as PNG files.

Every function takes the loaded experiment and the output directory, writes
one PNG and returns a :class:`Plot` (file name, title, caption for the
pages), or None when the experiment has nothing to show there (no postcopy
request at all, no pass records, ...). Figures are built on
``matplotlib.figure.Figure`` directly, never through pyplot: no display, no
global state shared between reports.

A configuration keeps its colour in every figure. Only completed runs are
drawn: a failed run's figures stop wherever it broke and would mislead; the
pages list failed runs separately.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..latency import HIST_BUCKETS
from .records import Configuration, Experiment, RunRecord, aggregate, channel_bytes, latency_histogram, \
    pass_series, run_metrics

MIB = 1 << 20
DPI = 100
PLOT_FILES = ("headline.png", "latency_cdf.png", "latency_cdf_by_channel.png", "latency_histogram.png",
              "passes.png", "guest_progress.png", "channel_bytes.png")


@dataclass
class Plot:
    """A written figure and what the pages say about it."""

    file: str
    title: str
    caption: str


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, out: str, name: str) -> str:
    fig.savefig(os.path.join(out, name), dpi=DPI, facecolor="white")
    return name


def _colors(exp: Experiment) -> dict[int, tuple]:
    """One colour per configuration, the same in every figure."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(exp.configs) <= 10 else "tab20"]
    return {c.index: cmap(i % cmap.N) for i, c in enumerate(exp.configs)}


def _wrapped_label(c: Configuration, width: int = 24) -> str:
    """The swept settings one per line, long values broken after + or , (bar labels on a y axis)."""
    out = []
    for line in c.lines or [c.label]:
        cur = ""
        for tok in line.replace("+", "+\0").replace(", ", ",\0").replace("=", "=\0").split("\0"):
            if cur and len(cur) + len(tok) > width:
                out.append(cur)
                cur = "  " + tok.lstrip()
            else:
                cur += tok
        out.append(cur)
    return "\n".join(out)


def _bar_height(configs: list[Configuration]) -> float:
    """Figure height for horizontal bars: enough room for each configuration's label lines."""
    lines = sum(max(1, _wrapped_label(c).count("\n") + 1) for c in configs)
    return max(2.6, 1.3 + 0.42 * len(configs) + 0.16 * lines)


def _fmt_us(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.3g} s"
    if us >= 1e3:
        return f"{us / 1e3:.3g} ms"
    return f"{us:.3g} µs"


def _grid(n: int) -> tuple[int, int]:
    cols = 1 if n <= 3 else 2
    return (n + cols - 1) // cols, cols


def _plotted(exp: Experiment) -> list[Configuration]:
    return [c for c in exp.configs if c.completed]


# --- figures ---------------------------------------------------------------------

def headline(exp: Experiment, out: str) -> Plot | None:
    """Bars: mean total time, downtime and bytes sent per configuration, whiskers min-max, dots per run."""
    configs = _plotted(exp)
    if not configs:
        return None
    colors = _colors(exp)
    panels = (("total-time-ms", "total time (ms)", 1), ("downtime-ms", "downtime (ms)", 1),
              ("transferred-bytes", "data sent (MiB)", MIB))
    n = len(configs)
    fig = _figure(12, _bar_height(configs))
    axes = fig.subplots(1, len(panels), sharey=True)
    y = np.arange(n)
    for ax, (key, label, scale) in zip(axes, panels):
        for i, c in enumerate(configs):
            vals = [v / scale for v in (run_metrics(r)[key] for r in c.completed) if v is not None]
            if not vals:
                continue
            a = aggregate(vals)
            ax.barh(i, a["mean"], color=colors[c.index], alpha=0.85, height=0.6,
                    xerr=[[a["mean"] - a["min"]], [a["max"] - a["mean"]]] if len(vals) > 1 else None,
                    capsize=4, ecolor="0.25")
            ax.plot(vals, np.full(len(vals), i), "o", color="black", markersize=3.5, zorder=3)
        ax.set_title(label.split(" (")[0])
        ax.set_xlabel(label)
        ax.set_xlim(left=0)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [_wrapped_label(c) for c in configs], fontsize=8)
    axes[0].invert_yaxis()  # the first configuration on top, as in the table
    fig.suptitle(f"{exp.name}: time and data per configuration")
    caption = ("Mean over the completed repeats of each configuration; whiskers span the fastest to the "
               "slowest repeat and each dot is one run. Total time runs from the start of the migration to "
               "the destination's confirmation and digest check; downtime is the time the guest was "
               "stopped on the source before it ran again (on the destination in postcopy).")
    caption += _best_sentence(configs, "total-time-ms", "the shortest mean total time", "ms")
    caption += _best_sentence(configs, "downtime-ms", "the shortest mean downtime", "ms")
    return Plot(_save(fig, out, "headline.png"), "Total time, downtime and data sent", caption)


def _best_sentence(configs: list[Configuration], key: str, what: str, unit: str) -> str:
    means = []
    for c in configs:
        a = aggregate([run_metrics(r)[key] for r in c.completed])
        if a["mean"] is not None:
            means.append((a["mean"], c))
    if len(means) < 2:
        return ""
    v, c = min(means, key=lambda m: m[0])
    return f" {c.label} has {what} ({v:.3g} {unit})."


def _pooled_samples(c: Configuration, channel: str = "all") -> np.ndarray:
    parts = [r.latency_samples(channel) for r in c.completed]
    return np.concatenate(parts) if parts else np.zeros(0)


def latency_cdf(exp: Experiment, out: str) -> Plot | None:
    """Step CDF of request latencies per configuration, pooled over repeats, log x."""
    colors = _colors(exp)
    curves = [(c, np.sort(_pooled_samples(c))) for c in _plotted(exp)]
    curves = [(c, s) for c, s in curves if len(s)]
    if not curves:
        return None
    fig = _figure(8.5, 5)
    ax = fig.subplots()
    for c, s in curves:
        y = np.arange(1, len(s) + 1) / len(s)
        ax.step(s, y, where="post", color=colors[c.index], linewidth=1.6, label=f"{c.label} (n={len(s)})")
    for q in (0.5, 0.99):
        ax.axhline(q, color="0.6", linewidth=0.8, linestyle=":")
        ax.text(1.0, q, f" p{int(q * 100)}", transform=ax.get_yaxis_transform(), va="center", fontsize=8,
                color="0.4")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("request latency (µs, log scale): request sent → host page placed")
    ax.set_ylabel("fraction of requests answered")
    ax.set_title(f"{exp.name}: postcopy page-request latency (CDF)")
    ax.grid(which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    caption = ("Share of the destination's page requests answered within a given time (from sending the "
               "request to placing the host page), pooled over the completed repeats of each configuration. "
               "A curve further left is faster; where it meets the p99 line is its tail.")
    if len(curves) > 1:
        p99 = [(float(np.percentile(s, 99)), c) for c, s in curves]
        v, c = min(p99, key=lambda m: m[0])
        caption += f" {c.label} has the lowest p99 ({_fmt_us(v)})."
    drawn = {c.index for c, _ in curves}
    no_req = [c for c in _plotted(exp) if c.index not in drawn]
    if no_req:
        caption += (" Not drawn (no postcopy request): " + "; ".join(c.label for c in no_req) + ".")
    return Plot(_save(fig, out, "latency_cdf.png"), "Request latency (CDF)", caption)


def latency_cdf_by_channel(exp: Experiment, out: str) -> Plot | None:
    """Per configuration whose requests were answered on more than one channel: one CDF per channel."""
    split = []
    for c in _plotted(exp):
        chans = sorted({ch for r in c.completed for ch in r.latency_channels()})
        if len(chans) > 1:
            split.append((c, chans))
    if not split:
        return None
    rows, cols = _grid(len(split))
    fig = _figure(6.5 * cols, 3.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    styles = ["-", "--", "-.", ":"]
    for ax, (c, chans) in zip(axes, split):
        for i, ch in enumerate(chans):
            s = np.sort(_pooled_samples(c, ch))
            if not len(s):
                continue
            ax.step(s, np.arange(1, len(s) + 1) / len(s), where="post", linestyle=styles[i % len(styles)],
                    linewidth=1.6, label=f"{ch} (n={len(s)})")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(c.label, fontsize=9)
        ax.set_xlabel("request latency (µs, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.grid(which="both", alpha=0.25)
        ax.legend(fontsize=8, title="page placed from", title_fontsize=8, loc="lower right")
    for ax in axes[len(split):]:
        ax.set_visible(False)
    fig.suptitle(f"{exp.name}: request latency by the channel that delivered the page")
    caption = ("For configurations whose requested pages arrived on more than one channel, the latency CDF "
               "of each channel. With postcopy-preempt the source sends requested pages on the postcopy "
               "channel, but a page already queued on the precopy channel may still arrive there first; "
               "the channel a request is counted under is the one whose page completed it.")
    return Plot(_save(fig, out, "latency_cdf_by_channel.png"), "Request latency by channel", caption)


def latency_hist(exp: Experiment, out: str) -> Plot | None:
    """Grouped bars over QEMU's log2 latency buckets, as shares of each configuration's requests."""
    colors = _colors(exp)
    hists = []
    for c in _plotted(exp):
        s = _pooled_samples(c)
        if len(s):
            h = np.asarray(latency_histogram(s), dtype=float)
        else:
            # Records without raw samples still carry the destination's histogram.
            dists = [r.destination.get("postcopy-latency-dist") for r in c.completed]
            dists = [np.asarray(d[:HIST_BUCKETS], dtype=float) for d in dists if isinstance(d, list) and d]
            if not dists:
                continue
            h = np.sum([np.pad(d, (0, HIST_BUCKETS - len(d))) for d in dists], axis=0)
        if h.sum() > 0:
            hists.append((c, h))
    if not hists:
        return None
    nz = np.flatnonzero(np.sum([h for _, h in hists], axis=0))
    lo, hi = int(nz[0]), int(nz[-1])
    buckets = np.arange(lo, hi + 1)
    fig = _figure(max(7.5, 0.55 * len(buckets) * max(1, len(hists)) ** 0.5 + 3), 4.8)
    ax = fig.subplots()
    width = 0.8 / len(hists)
    for i, (c, h) in enumerate(hists):
        share = h[lo:hi + 1] / h.sum() * 100
        ax.bar(buckets - 0.4 + width * (i + 0.5), share, width=width, color=colors[c.index],
               label=f"{c.label} (n={int(h.sum())})")
    ax.set_xticks(buckets, [_fmt_us(2.0 ** b) for b in buckets], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("request latency bucket: [2^N, 2^(N+1)) µs, labelled by its lower bound")
    ax.set_ylabel("share of requests (%)")
    ax.set_title(f"{exp.name}: request latency histogram (log2 buckets)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    caption = ("The same latencies in QEMU's postcopy-latency-dist buckets (bucket N holds latencies in "
               "[2^N, 2^(N+1)) µs), as shares of each configuration's requests so configurations with "
               "different request counts compare. Two humps usually mean two paths: pages sent at once on "
               "request, and pages that waited behind the background stream.")
    return Plot(_save(fig, out, "latency_histogram.png"), "Request latency histogram", caption)


def passes(exp: Experiment, out: str) -> Plot | None:
    """Per pass: throughput and dirty rate (MiB/s), and memory still dirty at its start (MiB)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    colors = _colors(exp)
    series = [(c, r, pass_series(r)) for c in _plotted(exp) for r in c.completed]
    series = [x for x in series if x[2]]
    if not series:
        return None
    fig = _figure(9, 7.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    labelled = set()
    order = {c.index: i for i, c in enumerate(_plotted(exp))}
    for c, r, ps in series:
        col = colors[c.index]
        label = None if c.index in labelled else c.label
        labelled.add(c.index)
        # A small sideways offset per configuration: configurations with the same passes would hide each other.
        dx = (order[c.index] - (len(order) - 1) / 2) * min(0.06, 0.3 / max(1, len(order)))
        x = [p["pass"] + dx for p in ps]
        thr = [p["throughput"] / MIB if p["throughput"] else np.nan for p in ps]
        dirty = [p["dirty-rate"] / MIB if p["dirty-rate"] else np.nan for p in ps]
        rem = [p["dirty-bytes"] / MIB if p["dirty-bytes"] is not None else np.nan for p in ps]
        top.plot(x[:-1], thr[:-1], "-o", color=col, markersize=4, label=label)
        if len(x) > 1 and not np.isnan(thr[-2]):
            top.plot(x[-2:], thr[-2:], ":", color=col)  # joins the final phase, drawn hollow
        top.plot(x[-1:], thr[-1:], "o", color=col, markerfacecolor="white", markersize=6)
        top.plot(x, dirty, "--x", color=col, markersize=5, alpha=0.8)
        bottom.plot(x, rem, "-o", color=col, markersize=4, label=label)
    top.set_ylabel("MiB/s")
    top.set_title(f"{exp.name}: per-pass throughput and guest dirty rate")
    top.grid(alpha=0.3)
    top.set_ylim(bottom=0)
    style = [Line2D([], [], color="0.3", marker="o", markersize=4, label="sent during the pass"),
             Line2D([], [], color="0.3", marker="o", markerfacecolor="white", linestyle="none",
                    label="final phase (stop-and-copy / postcopy)"),
             Line2D([], [], color="0.3", linestyle="--", marker="x", label="dirtied by the guest")]
    handles, _ = top.get_legend_handles_labels()
    top.legend(handles=handles + style, fontsize=8, loc="best")
    bottom.set_ylabel("dirty at the pass start (MiB)")
    bottom.set_xlabel("pass (dirty-log sync)")
    bottom.set_title("memory still to send at the start of each pass")
    bottom.grid(alpha=0.3)
    bottom.set_ylim(bottom=0)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    caption = ("Top: the bytes each precopy pass sent divided by its duration (solid), and the rate at which "
               "the guest dirtied memory during that pass (dashed), in MiB/s; precopy converges while the "
               "first stays well above the second. The hollow point is the final phase: stop-and-copy, or "
               "everything sent after the switch to postcopy. A pass that sent nothing (the sync just "
               "before the guest stops) has no point. Bottom: memory still dirty when each pass began. "
               "Every completed repeat is drawn.")
    return Plot(_save(fig, out, "passes.png"), "Per-pass throughput and dirty rate", caption)


def _running_spans(run: RunRecord, side: str) -> list[tuple[float, float]]:
    """(from, to) epoch spans in which the guest was meant to run on ``side``, from its marks."""
    spans, opened = [], None
    for t, m in sorted(tuple(x) for x in ((run.progress(side) or {}).get("marks") or [])):
        if m in ("start", "resume") and opened is None:
            opened = t
        elif m in ("pause", "stop") and opened is not None:
            spans.append((opened, t))
            opened = None
    if opened is not None:
        spans.append((opened, float("inf")))
    return spans


def _series(run: RunRecord, side: str, t0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Step times (s from t0), ms/GiB (NaN: no progress), the stall mask and the sampling interval of one side.

    Samples go on after the guest paused or stopped on a side (the sampler
    runs until the workload stops); those are left out, since a guest that is
    not meant to run there making no progress says nothing.
    """
    p = run.progress(side) or {}
    t = np.asarray(p.get("t") or [], dtype=float)
    v = np.asarray([np.nan if x is None else x for x in (p.get("ms_per_gib") or [])], dtype=float)
    spans = _running_spans(run, side)
    step = float(p.get("interval") or 0.1)
    if spans and len(t):
        # A sample covers the interval before its time: keep it if that interval overlaps a running span.
        keep = np.zeros(len(t), dtype=bool)
        for a, b in spans:
            keep |= (t > a) & (t - step < b)
        t, v = t[keep], v[keep]
    stalled = np.isnan(v)
    if len(t):
        # Each value holds over the interval before its time: start the steps one interval earlier.
        t, v = np.concatenate(([t[0] - step], t)), np.concatenate(([v[0]], v))
        stalled = np.concatenate(([False], stalled))
    return t - t0, v, stalled, step


def _marks(run: RunRecord, side: str, name: str, t0: float) -> list[float]:
    return [m[0] - t0 for m in ((run.progress(side) or {}).get("marks") or []) if m[1] == name]


def guest_progress(exp: Experiment, out: str) -> Plot | None:
    """ms/GiB over time of one run per configuration, source then destination, with the switch marked."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    shown = []
    for c in _plotted(exp):
        r = c.representative()
        if r is not None and any(len((r.progress(s) or {}).get("t") or []) for s in ("source", "destination")):
            shown.append((c, r))
    if not shown:
        return None
    rows, cols = _grid(len(shown))
    fig = _figure(7.5 * cols, 3.1 * rows + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    side_color = {"source": "tab:blue", "destination": "tab:orange"}
    for ax, (c, r) in zip(axes, shown):
        t0 = r.migration_start() or 0.0
        for side in ("source", "destination"):
            t, v, stalled, step = _series(r, side, t0)
            if not len(t):
                continue
            ax.plot(t, v, "-", color=side_color[side], linewidth=1.4, drawstyle="steps-pre")
            if stalled.any():
                # No progress at all in the interval: no value to draw on a log axis, so mark it along the top.
                ax.plot(t[stalled] - step / 2, np.full(stalled.sum(), 0.96), "x", color=side_color[side],
                        transform=ax.get_xaxis_transform(), markersize=5, clip_on=False)
        pauses = _marks(r, "source", "pause", t0)
        starts = sorted(_marks(r, "destination", "start", t0) + _marks(r, "destination", "resume", t0))
        for p in pauses:
            ax.axvline(p, color="0.35", linestyle="--", linewidth=1)
            later = [s for s in starts if s >= p]
            if later:
                ax.axvspan(p, later[0], color="tab:red", alpha=0.12, linewidth=0)
        for s in starts:
            ax.axvline(s, color="tab:green", linestyle=":", linewidth=1.2)
        sw = r.switchover()
        if sw is not None:
            ax.axvline(sw - t0, color="tab:red", linewidth=1.2)
        ax.set_yscale("log")
        ax.set_title(f"{c.label} — run {r.id}", fontsize=9)
        ax.set_xlabel("time since migration start (s)")
        ax.set_ylabel("ms per GiB touched (log)")
        ax.grid(which="both", alpha=0.25)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    legend = [Line2D([], [], color=side_color["source"], label="guest on the source"),
              Line2D([], [], color=side_color["destination"], label="guest on the destination"),
              Line2D([], [], color="0.3", marker="x", linestyle="none", label="no progress in the interval"),
              Line2D([], [], color="tab:red", label="switchover"),
              Line2D([], [], color="0.35", linestyle="--", label="guest paused (source)"),
              Line2D([], [], color="tab:green", linestyle=":", label="guest started (destination)"),
              Patch(color="tab:red", alpha=0.12, label="guest runs nowhere")]
    fig.legend(handles=legend, loc="outside lower center", ncols=4, fontsize=8)
    fig.suptitle(f"{exp.name}: guest progress during the migration")
    caption = ("How long the guest takes to touch a GiB of memory (ms/GiB, lower is faster, log scale), "
               "sampled every 0.1 s, for the first completed repeat of each configuration: the source's "
               "series until the guest stops there, then the destination's. The shaded span is when the "
               "guest ran nowhere (paused on the source, not yet started on the destination); a cross "
               "along the top is an interval in which the guest made no progress at all, e.g. blocked on "
               "page faults.")
    return Plot(_save(fig, out, "guest_progress.png"), "Guest progress over time", caption)


def channel_bytes_plot(exp: Experiment, out: str) -> Plot | None:
    """Stacked bars: mean bytes per channel per configuration (source side)."""
    configs = _plotted(exp)
    per = []
    chans: list[str] = []
    for c in configs:
        runs = [channel_bytes(r) for r in c.completed]
        for b in runs:
            for ch in b:
                if ch not in chans:
                    chans.append(ch)
        per.append((c, runs))
    if not chans:
        return None
    chans.sort(key=lambda ch: (ch != "precopy", ch))  # the main channel at the bottom
    n = len(configs)
    fig = _figure(10, _bar_height(configs) + 0.4)
    ax = fig.subplots()
    from matplotlib import colormaps

    cmap = colormaps["Set2"]
    left = np.zeros(n)
    for j, ch in enumerate(chans):
        vals = np.array([np.mean([b.get(ch, 0) for b in runs]) / MIB if runs else 0 for _, runs in per])
        ax.barh(np.arange(n), vals, left=left, height=0.6, color=cmap(j % cmap.N), label=ch,
                edgecolor="white", linewidth=0.5)
        left += vals
    for i, total in enumerate(left):
        ax.text(total, i, f" {total:.1f} MiB", ha="left", va="center", fontsize=8)
    ax.set_yticks(np.arange(n), [_wrapped_label(c) for c, _ in per], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left.max(), 1e-9) * 1.18)  # room for the totals
    ax.set_xlabel("bytes sent by the source (MiB, mean over the completed repeats)")
    ax.set_title(f"{exp.name}: bytes per migration channel")
    ax.legend(title="channel", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="x", alpha=0.3)
    caption = ("Mean bytes the source sent on each channel, stacked, with the total on top. The precopy "
               "channel is the main migration stream; with postcopy-preempt, pages the destination "
               "requested travel on the postcopy channel instead of queueing behind the background stream.")
    return Plot(_save(fig, out, "channel_bytes.png"), "Bytes per channel", caption)


FIGURES = (headline, latency_cdf, latency_cdf_by_channel, latency_hist, passes, guest_progress,
           channel_bytes_plot)


def write_plots(exp: Experiment, out: str) -> list[Plot]:
    """Write every figure that has data; remove a previous report's PNG that has none now."""
    plots = []
    for f in FIGURES:
        p = f(exp, out)
        if p is not None:
            plots.append(p)
    written = {p.file for p in plots}
    for name in PLOT_FILES:
        path = os.path.join(out, name)
        if name not in written and os.path.exists(path):
            os.remove(path)  # stale: the pages must not sit next to a figure of other data
    return plots
