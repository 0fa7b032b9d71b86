#!/usr/bin/env python3
"""Plots the results of bench/run.py: one PNG per case.

Usage: plot.py RESULTS.jsonl OUTDIR
RESULTS is the raw file run.py writes (a line of metadata, then one result per
line); the plots go to OUTDIR/bench-<case>.png.
"""

import json
import math
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

COLORS = {
    "procpool": "#1f5fbf",
    "procpool@hugetlb": "#1f5fbf",
    "procpool_into": "#1f5fbf",
    "floor": "#000000",
    "floor_into": "#000000",
    "alloc": "#7f7f7f",
    "py_executor_default": "#8e44ad",
    "fork": "#555555",
    "threads": "#2a9d3a",
    "serial": "#7f7f7f",
    "py_pool_default": "#e07b00",
    "py_pool_tuned": "#c0392b",
    "py_executor": "#8e44ad",
    "py_pool": "#e07b00",
    "py_apply_async": "#e07b00",
    "futex": "#555555",
    "pipe": "#999999",
    "memcpy": "#555555",
    "first_touch": "#999999",
}

LABELS = {
    "procpool": "procpool map",
    "procpool@hugetlb": "procpool map, glibc malloc on huge pages",
    "procpool_into": "procpool map_into, into a vector kept across calls",
    "floor": "the floor: fork + shared memory, no encoding, no safety",
    "floor_into": "the floor, into a vector made once",
    "alloc": "new vector<int64_t>(n) alone",
    "threads": "thread pool (2 std::threads), result vector reused",
    "serial": "serial C++, result vector reused",
    "py_pool_default": "Python Pool.map, default chunks",
    "py_pool_tuned": "Python Pool.map, tuned chunks",
    "py_executor": "Python ProcessPoolExecutor.map, chunksize n/8",
    "py_executor_default": "Python ProcessPoolExecutor.map, chunksize 1",
}

STYLES = {
    "procpool@hugetlb": {"linestyle": "--", "marker": "s", "linewidth": 1.5},
    "procpool_into": {"linestyle": ":", "marker": "o", "linewidth": 1.5},
    "floor": {"linestyle": "-", "marker": "v", "linewidth": 1.5},
    "floor_into": {"linestyle": "--", "marker": "v", "linewidth": 1, "markersize": 4},
    "alloc": {"linestyle": ":", "marker": ".", "linewidth": 1.5},
    "serial": {"linestyle": ":", "marker": "o", "linewidth": 1.5},
    "py_executor_default": {"linestyle": "none", "marker": "D", "markersize": 7},
}


class Results:
    def __init__(self, path):
        lines = Path(path).read_text().splitlines()
        self.meta = json.loads(lines[0])
        self.by = {}
        for line in lines[1:]:
            r = json.loads(line)
            self.by[(r["case"], r["impl"], r["x"])] = r

    def xs(self, case, impl):
        return sorted(x for (c, i, x) in self.by if c == case and i == impl)

    def has(self, case):
        return any(c == case for (c, _, _) in self.by)

    def get(self, case, impl, x):
        return self.by.get((case, impl, x))

    def med(self, case, impl, x, field="samples"):
        r = self.get(case, impl, x)
        return statistics.median(r[field]) if r and r.get(field) else None

    def ns_per_item(self, case, impl, x):
        r = self.get(case, impl, x)
        m = self.med(case, impl, x)
        return m / r["items"] * 1e9 if m is not None and r["items"] else None


def subtitle(R):
    m = R.meta
    machine = m.get("machine", {})
    quick = " — quick run" if m.get("mode") == "quick" else ""
    return f"{machine.get('cpu', '?')}, {machine.get('cpus', '?')} CPUs, {m.get('date', '')}{quick}"


def finish(fig, ax, R, title, path):
    ax.set_title(title, fontsize=12, loc="left")
    fig.text(0.01, 0.01, subtitle(R), fontsize=7, color="#666666")
    ax.grid(True, which="major", color="#dddddd", linewidth=0.8)
    ax.grid(True, which="minor", color="#f0f0f0", linewidth=0.5)
    ax.set_axisbelow(True)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pow10_label(v, _pos=None):
    if v <= 0:
        return ""
    e = round(math.log10(v))
    if abs(v - 10**e) < 1e-9 * v:
        return f"$10^{{{e}}}$" if e >= 3 or e < 0 else f"{int(v)}"
    return f"{v:g}"


def plot_tiny(R, out):
    fig, ax = plt.subplots(figsize=(10, 5))
    for impl in ["py_executor_default", "py_executor", "py_pool_default", "py_pool_tuned",
                 "procpool", "procpool_into", "procpool@hugetlb", "floor", "floor_into", "threads", "alloc",
                 "serial"]:
        xs = [x for x in R.xs("tiny", impl) if R.ns_per_item("tiny", impl, x)]
        if not xs:
            continue
        ys = [R.ns_per_item("tiny", impl, x) for x in xs]
        style = {"marker": "o", "linewidth": 2.5 if impl == "procpool" else 1.5}
        style.update(STYLES.get(impl, {}))
        ax.plot(xs, ys, color=COLORS[impl], label=LABELS[impl], **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(pow10_label))
    ax.set_xlabel("items per map (n)")
    ax.set_ylabel("nanoseconds per item (lower is better)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    finish(fig, ax, R, "Tiny items: map of x*x over n ints, 2 workers", out / "bench-tiny.png")


def plot_chunks(R, out):
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for impl, label in [("py_pool", "Python Pool.map"), ("procpool", "procpool map"),
                        ("floor", "the floor: fork + shared memory, no encoding, no safety")]:
        xs = R.xs("chunks", impl)
        if not xs:
            continue
        style = {"marker": "o", "linewidth": 2.5 if impl == "procpool" else 1.5}
        style.update(STYLES.get(impl, {}))
        ax.plot(xs, [R.ns_per_item("chunks", impl, x) for x in xs], color=COLORS[impl],
                label=label, **style)
    r = R.get("chunks", "procpool", 1)
    n = int(r["items"]) if r else 0
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(pow10_label))
    ax.set_xlabel("chunk size (items)")
    ax.set_ylabel("nanoseconds per item (lower is better)")
    ax.legend(fontsize=9)
    finish(fig, ax, R, f"Chunk size: map of x*x over {n:,} ints, 2 workers", out / "bench-chunks.png")


def plot_cpu(R, out):
    fig, ax = plt.subplots(figsize=(7.5, 5))
    cs, ps = R.med("cpu", "serial", 1), R.med("cpu", "py_serial", 1)
    series = [("procpool", "procpool", cs), ("threads", "thread pool", cs),
              ("py_pool", "Python Pool.map", ps)]
    workers = R.xs("cpu", "procpool")
    width = 0.26
    for k, (impl, label, serial) in enumerate(series):
        xs = R.xs("cpu", impl)
        if not xs or not serial:
            continue
        ys = [serial / R.med("cpu", impl, w) for w in xs]
        pos = [workers.index(w) + (k - 1) * width for w in xs]
        bars = ax.bar(pos, ys, width, color=COLORS[impl], label=label)
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y + 0.03, f"{y:.2f}", ha="center", fontsize=7)
    cpus = int(R.meta.get("machine", {}).get("cpus", 2) or 2)
    for i, w in enumerate(workers):
        ideal = min(w, cpus)
        ax.plot([i - 1.5 * width, i + 1.5 * width], [ideal, ideal], color="black", linestyle="--",
                linewidth=1, label="ideal: min(workers, CPUs)" if i == 0 else None)
    ax.set_xticks(range(len(workers)))
    ax.set_xticklabels([f"{int(w)} worker{'s' if w > 1 else ''}" for w in workers])
    ax.set_ylabel("speedup over the serial loop (higher is better)")
    ax.set_ylim(0, max(2.6, cpus + 0.6))
    ax.legend(fontsize=8, loc="upper left")
    r = R.get("cpu", "serial", 1)
    tasks = int(r["items"]) if r else 0
    ms = r["task_ms"][0] if r else 0
    finish(fig, ax, R, f"CPU-bound: {tasks} tasks of {ms:g} ms ({cpus} CPUs)", out / "bench-cpu.png")


def plot_latency(R, out):
    rows = [("pipe", "OS pipe ping-pong"), ("futex", "futex ping-pong"),
            ("floor", "the floor: call(x)"),
            ("procpool", "procpool submit().get()"),
            ("py_apply_async", "Python apply_async().get()"),
            ("py_executor", "Python executor.submit().result()")]
    rows = [(impl, label) for impl, label in rows if R.xs("latency", impl)]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (impl, label) in enumerate(rows):
        x = R.xs("latency", impl)[0]
        m, p99 = R.med("latency", impl, x) * 1e6, R.med("latency", impl, x, "p99") * 1e6
        ax.barh(i, m, color=COLORS.get(impl, "#e07b00" if impl.startswith("py") else "#1f5fbf"),
                height=0.6)
        ax.plot([p99], [i], marker="|", markersize=14, color="black")
        # Sub-microsecond round trips (the floor's) keep two digits.
        ms, p99s = (f"{m:.2f}", f"{p99:.1f}") if m < 2 else (f"{m:.1f}", f"{p99:.0f}")
        ax.text(m * 1.08, i + 0.22, f"{ms} µs (p99 {p99s})", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for _, label in rows], fontsize=9)
    for goal in (2, 20):
        ax.axvline(goal, color="#c0392b", linestyle="--", linewidth=1)
        ax.text(goal * 1.05, -0.45, f"goal: {goal} µs", color="#c0392b", fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("round trip, µs (median bar; | marks the 99th percentile; lower is better)")
    finish(fig, ax, R, "Round trip of one small task", out / "bench-latency.png")


def plot_big(R, out):
    rows = [("memcpy", "memcpy (pages mapped)"), ("first_touch", "copy into fresh pages"),
            ("procpool@hugetlb", "procpool map, malloc on huge pages"),
            ("procpool", "procpool map"), ("py_pool_tuned", "Python Pool.map, chunksize 1"),
            ("py_pool_default", "Python Pool.map, default")]
    size = None
    for impl, _ in rows:
        if R.xs("big", impl):
            size = R.xs("big", impl)[0]
            break
    if size is None:
        return
    rows = [(impl, label) for impl, label in rows if R.get("big", impl, size)]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (impl, label) in enumerate(rows):
        r = R.get("big", impl, size)
        gib = r["bytes"][0] / R.med("big", impl, size) / 2**30
        color = COLORS.get(impl, "#e07b00")
        ax.barh(i, gib, color=color, height=0.6, hatch="//" if "@" in impl else None,
                edgecolor="white" if "@" in impl else None)
        ax.text(gib * 1.08, i, f"{gib:.2f} GiB/s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for _, label in rows], fontsize=9)
    ax.axvline(3, color="#c0392b", linestyle="--", linewidth=1)
    ax.text(3 * 1.05, -0.45, "goal: 3 GiB/s", color="#c0392b", fontsize=7, va="bottom")
    ax.set_xscale("log")
    left, right = ax.get_xlim()
    ax.set_xlim(left, right * 3)  # room for the labels of the longest bars
    ax.set_xlabel("GiB/s of input (higher is better)")
    r = R.get("big", "procpool", size)
    count = int(r["items"]) if r else 0
    finish(fig, ax, R, f"Big items: identity map over {count} × {int(size) >> 20} MiB",
           out / "bench-big.png")


def plot_startup(R, out):
    series = [("fork", "bare fork + _exit + waitpid", COLORS["fork"]),
              ("procpool", "procpool: construct + destroy", COLORS["procpool"]),
              ("procpool_first", "procpool: + first result", "#7fa7e0"),
              ("py_pool", "Python: Pool() + close + join", COLORS["py_pool"]),
              ("py_pool_first", "Python: + first result", "#f2b66b")]
    workers = R.xs("startup", "procpool")
    if not workers:
        return
    series = [s for s in series if R.xs("startup", s[0])]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    width = 0.8 / len(series)
    for k, (impl, label, color) in enumerate(series):
        xs = R.xs("startup", impl)
        ys = [R.med("startup", impl, w) * 1e3 for w in xs]
        pos = [workers.index(w) + (k - (len(series) - 1) / 2) * width for w in xs]
        bars = ax.bar(pos, ys, width, color=color, label=label)
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y * 1.1, f"{y:.1f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(workers)))
    ax.set_xticklabels([f"{int(w)} worker{'s' if w > 1 else ''}" for w in workers])
    ax.axhline(3, color="#c0392b", linestyle="--", linewidth=1, label="goal for 2 workers: 3 ms")
    ax.set_yscale("log")
    bottom, top = ax.get_ylim()
    ax.set_ylim(min(bottom, 1), top * 1.5)
    ax.set_ylabel("milliseconds (lower is better)")
    ax.legend(fontsize=8, loc="upper left")
    finish(fig, ax, R, "Start-up and shut-down of a pool", out / "bench-startup.png")


def plot_imap(R, out):
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for impl, label in [("procpool", "procpool imap"), ("py_pool", "Python Pool.imap, chunksize 4096")]:
        xs = R.xs("imap", impl)
        if not xs:
            continue
        peak = [R.med("imap", impl, x, "peak_rss_kib") / 1024 for x in xs]
        base = [R.med("imap", impl, x, "base_rss_kib") / 1024 for x in xs]
        c = COLORS[impl]
        ax.plot(xs, peak, marker="o", color=c, label=f"{label}: peak RSS", linewidth=2)
        ax.plot(xs, base, marker=".", color=c, linestyle=":", label=f"{label}: before the first item")
    ax.axhline(64, color="#c0392b", linestyle="--", linewidth=1, label="64 MiB")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(pow10_label))
    ax.set_ylim(0, None)
    ax.set_xlabel("items (a lazy input, made one at a time)")
    ax.set_ylabel("parent's peak RSS, MiB")
    ax.legend(fontsize=8, loc="upper left")
    finish(fig, ax, R, "Bounded memory: imap over a lazy input, 2 workers", out / "bench-imap.png")


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    R = Results(sys.argv[1])
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    # A case that did not run keeps the plot it has.
    for case, plot in (("tiny", plot_tiny), ("chunks", plot_chunks), ("cpu", plot_cpu),
                       ("latency", plot_latency), ("big", plot_big), ("startup", plot_startup),
                       ("imap", plot_imap)):
        if R.has(case):
            plot(R, out)


if __name__ == "__main__":
    main()
