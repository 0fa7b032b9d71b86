#!/usr/bin/env python3
"""Runs bench/pool_bench and bench/python/pool_ref.py side by side, case by
case, and writes the benchmark page (Markdown) and its plots.

Called by scripts/bench, which builds pool_bench first; see `--help`.
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["tiny", "chunks", "cpu", "latency", "big", "startup", "imap", "heavy", "async"]

# The item counts of the imap case, one process each (peak RSS is per process).
IMAP_ITEMS = {
    "full": {"c++": [10**6, 10**7, 10**8], "python": [10**6, 10**7, 10**8]},
    "quick": {"c++": [10**5, 10**6, 10**7], "python": [10**4, 10**5, 10**6]},
}

# A second, C++-only measurement of the cases where fresh memory dominates,
# with glibc's malloc asked to back its memory with transparent huge pages:
# it separates the cost of page faults on this machine from procpool's own.
HUGETLB_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
HUGETLB_RUNS = {"tiny": "procpool,alloc", "big": "procpool"}


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def load1():
    return os.getloadavg()[0]


def wait_for_quiet(minutes, threshold):
    """Waits until the 1-minute load average is below `threshold`, checking
    every minute, for at most `minutes`. Returns the load when it stopped waiting."""
    deadline = time.monotonic() + 60 * minutes
    while True:
        load = load1()
        if load < threshold:
            return load
        if time.monotonic() >= deadline:
            log(f"load still {load:.2f} after {minutes} min; running anyway (noted in the page)")
            return load
        log(f"1-minute load average {load:.2f} >= {threshold}; waiting (checks every minute)")
        time.sleep(60)


def busy_processes(seconds=1.0, threshold=0.1):
    """Other processes that used at least `threshold` of a CPU over `seconds`:
    a list of (command, pid, share of one CPU, nice value), busiest first."""
    def snapshot():
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            close = stat.rindex(")")
            comm = stat[stat.index("(") + 1:close]
            fields = stat[close + 2:].split()
            # Fields from the third on: utime and stime are 14 and 15, nice is 19.
            out[int(entry)] = (comm, int(fields[11]) + int(fields[12]), int(fields[16]))
        return out

    before = snapshot()
    time.sleep(seconds)
    after = snapshot()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (comm, ticks, nice) in after.items():
        if pid == os.getpid() or pid not in before:
            continue
        share = (ticks - before[pid][1]) / hz / seconds
        if share >= threshold:
            busy.append((comm, pid, share, nice))
    return sorted(busy, key=lambda b: -b[2])


# ---------------------------------------------------------------------------
# The machine.

def lscpu():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip()] = v.strip()
    return fields


def first_line(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        return out.splitlines()[0].strip() if out else "?"
    except OSError:
        return "?"


def read_text(path, default="?"):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def hugetlb_usable():
    """True when transparent huge pages can be had on request and glibc
    knows the glibc.malloc.hugetlb tunable (2.35 and later)."""
    thp = read_text("/sys/kernel/mm/transparent_hugepage/enabled", "")
    if "[never]" in thp or not thp:
        return False
    version = platform.libc_ver()[1]
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def machine_info(bench, python):
    cpu = lscpu()
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    compiler = "?"
    cache = Path(bench).resolve().parent.parent / "CMakeCache.txt"
    build_type = "?"
    if cache.exists():
        text = cache.read_text()
        m = re.search(r"^CMAKE_CXX_COMPILER:\w+=(.*)$", text, re.M)
        if m:
            compiler = first_line([m.group(1), "--version"])
        m = re.search(r"^CMAKE_BUILD_TYPE:\w+=(.*)$", text, re.M)
        if m:
            build_type = m.group(1)
    py_path = shutil.which(python) or python
    py_version = first_line([python, "-c",
                             "import sys, platform; print(platform.python_implementation(), "
                             "sys.version.split()[0], sys.executable)"])
    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    # The page and plots an earlier run wrote are not changes to what is measured.
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no",
                            "--", ".", ":(exclude)docs/benchmarks.md", ":(exclude)docs/img"],
                           capture_output=True, text=True).stdout.strip()
    thp = read_text("/sys/kernel/mm/transparent_hugepage/enabled")
    return {
        "cpu": cpu.get("Model name", platform.processor() or "?"),
        "cpus": cpu.get("CPU(s)", str(os.cpu_count())),
        "threads_per_core": cpu.get("Thread(s) per core", "?"),
        "cores_per_socket": cpu.get("Core(s) per socket", "?"),
        "sockets": cpu.get("Socket(s)", "?"),
        "hypervisor": cpu.get("Hypervisor vendor", ""),
        "virtualized": "hypervisor" in cpu.get("Flags", ""),
        "affinity": len(os.sched_getaffinity(0)),
        "mem_gib": mem_kib / 2**20,
        "kernel": platform.release(),
        "glibc": " ".join(platform.libc_ver()),
        "thp": thp,
        "compiler": compiler,
        "build_type": build_type,
        "python": py_version,
        "python_cmd": py_path,
        "commit": commit + (" with uncommitted changes" if dirty else ""),
    }


# ---------------------------------------------------------------------------
# Running.

def run_json(cmd, what, env=None):
    shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    log(f"{what}: {shown + ' ' if shown else ''}{shlex.join(cmd)}")
    t = time.monotonic()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                       env=dict(os.environ, **env) if env else None)
    if p.returncode != 0:
        log(f"{what} FAILED (exit status {p.returncode}); see the messages above")
        sys.exit(1)
    out = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    log(f"{what}: {len(out)} results in {time.monotonic() - t:.1f} s")
    return out


def run_all(args, mode, hugetlb):
    flags = ["--json"] + (["--quick"] if args.quick else [])
    cxx = [str(args.bench)] + flags
    py = [args.python, str(ROOT / "bench" / "python" / "pool_ref.py")] + flags
    results, loads = [], [load1()]
    for case in args.cases:
        if case == "imap":
            for lang, base in (("c++", cxx), ("python", py)):
                for n in IMAP_ITEMS[mode][lang]:
                    results += run_json(base + ["--items", str(n), "imap"], f"imap {lang} {n}")
                    loads.append(load1())
            continue
        results += run_json(cxx + [case], f"{case} c++")
        loads.append(load1())
        results += run_json(py + [case], f"{case} python")
        loads.append(load1())
        if hugetlb and case in HUGETLB_RUNS:
            results += run_json(cxx + ["--tag", "hugetlb", "--only", HUGETLB_RUNS[case], case],
                                f"{case} c++, huge pages", HUGETLB_ENV)
            loads.append(load1())
    return results, loads


# ---------------------------------------------------------------------------
# The page.

class Results:
    def __init__(self, records):
        self.by = {(r["case"], r["impl"], r["x"]): r for r in records}

    def get(self, case, impl, x):
        return self.by.get((case, impl, x))

    def med(self, case, impl, x, field="samples"):
        r = self.get(case, impl, x)
        return statistics.median(r[field]) if r and r.get(field) else None

    def per_item_ns(self, case, impl, x):
        r = self.get(case, impl, x)
        m = self.med(case, impl, x)
        return m / r["items"] * 1e9 if m is not None and r["items"] else None

    def gib_s(self, case, impl, x):
        r = self.get(case, impl, x)
        m = self.med(case, impl, x)
        return r["bytes"][0] / m / 2**30 if m and r.get("bytes") else None

    def xs(self, case, impl):
        return sorted(x for (c, i, x) in self.by if c == case and i == impl)

    def has(self, case):
        return any(c == case for (c, _, _) in self.by)


def fmt_num(v, digits=3):
    """`v` with `digits` significant digits (whole numbers above 1000)."""
    if v is None:
        return "—"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    r = a / b
    return f"{r:,.0f}×" if r >= 100 else f"{r:.1f}×" if r >= 10 else f"{r:.2f}×"


def md_pow10(n):
    n = int(n)
    e = len(str(n)) - 1
    return f"10<sup>{e}</sup>" if n == 10**e else f"{n:,}"


def table(header, rows, left=1):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def ms(seconds):
    return f"{seconds * 1e3:.2f} ms" if seconds is not None else "—"


# What procpool's parent does with the bytes of a map, as the code stands
# (include/procpool/detail/engine/fork_engine.hpp and pool.hpp); the explanations of
# missed goals refer to it.
DATA_PATH = (
    "The parent sends and collects alone, on one core. A chunk of items that lie contiguous "
    "in the caller's input and are trivially sendable (numbers, plain structs), and any item "
    "of 16 KiB or more that is an array or a string, go into the worker's task ring straight "
    "from the input, in one copy; a chunk sent again (its worker died) reads them there again. "
    "Other items of a random-access input are encoded straight into the ring's free room (a "
    "chunk ends before an item that does not fit there), and encoded again from the input if "
    "the chunk must be sent again; the rest (an input read once, an item larger than the ring) "
    "are encoded into the chunk's own buffer (a settled chunk's, reused, kept for a resend) "
    "and copied into the ring. A worker writes its answer into its result ring's free room; "
    "when the room runs out, the results so far go out as a part, and the rest follow in the "
    "room the parent has freed (in the worker's own buffer, copied in after, when the parent "
    "is behind); a single result longer than the whole ring is sized first, by a writer that "
    "only counts, then encoded straight into the ring as the parent reads it, in a frame of "
    "its own. Each ring's memory is mapped twice in a row, so a "
    "frame of up to the ring's size (1 MiB) is one contiguous piece wherever it lies: result "
    "frames are decoded in place, and a frame larger than the ring is decoded piece by piece "
    "as it arrives (a big string or array copied from each piece into its storage), on both "
    "sides, with no buffer to gather it in. The vector `map` returns is reserved (in huge pages from 4 MiB); "
    "results are appended to it straight from the ring; an answer that comes before an "
    "earlier chunk's is left in its ring for up to 200 µs, and only if the earlier one is "
    "still missing then are the slots between value-initialized. So the "
    "parent writes plain input bytes once and every result byte once, as the thread pool's "
    "threads do, but after its workers wrote them into the ring (in place, when they fit the "
    "ring's free room, or, for a result of 16 KiB or more that is an array or a string, from "
    "the value the function returned), where the threads write them in place. Its cost per chunk is a frame each way: cutting it, copying it through the "
    "rings, checking the answer's header, and a wake-up when the worker went to sleep "
    "between batches.")


# The floor, as the sections that show it describe it (bench/floor_pool.hpp).
FLOOR_TEXT = (
    "*The floor* is the least a fork + shared-memory pool can do, measured by the same program: "
    "2 forked workers kept warm, one shared mapping, one `memcpy` of the input into it, chunks "
    "claimed from a shared counter, results written in place, one `memcpy` of the results out. "
    "No encoding and no safety: no crash detection, no timeouts, trivially copyable items only. "
    "Its parent spins up to 20 µs for the results before it sleeps on a futex, as procpool's "
    "does; its idle workers spin 2 µs before they sleep, as procpool's do.")


def tiny_breakdown(R, n):
    """The figures that explain procpool's time per item in the tiny case at n."""
    return {
        "pp": R.per_item_ns("tiny", "procpool", n),
        "th": R.per_item_ns("tiny", "threads", n),
        "alloc": R.per_item_ns("tiny", "alloc", n),
        "pp_faults": R.med("tiny", "procpool", n, "parent_faults"),
        "worker_faults": R.med("tiny", "procpool", n, "worker_faults"),
        "huge": R.per_item_ns("tiny", "procpool@hugetlb", n),
        "huge_alloc": R.per_item_ns("tiny", "alloc@hugetlb", n),
    }


def fault_cost_us(R):
    """Microseconds per first touch of a 4 KiB page (with its share of the
    copy), measured by the big case's first_touch; None if not measured."""
    for size in R.xs("big", "first_touch"):
        t = R.med("big", "first_touch", size)
        faults = R.med("big", "first_touch", size, "parent_faults")
        if t and faults:
            return t / faults * 1e6
    return None


def tiny_python_why(R, speed):
    """Why procpool was not 80 times faster than Python's Pool.map, from the figures."""
    parts = []
    for x, py, pp, _ in speed:
        if not (py and pp) or py / pp >= 80:
            continue
        s = (f"At n = {md_pow10(x)} Python's `Pool.map` took {fmt_num(py)} ns per item and "
             f"procpool {fmt_num(pp)}.")
        huge = R.per_item_ns("tiny", "procpool@hugetlb", x)
        faults = R.med("tiny", "procpool", x, "parent_faults")
        alloc = R.per_item_ns("tiny", "alloc", x)
        if faults and alloc:
            s += (f" Most of procpool's time here is the result vector: making it alone costs "
                  f"{fmt_num(alloc)} ns per item in the same run, {faults:,.0f} page faults per "
                  f"call (see the next goal).")
            if huge:
                s += (f" With glibc's allocator on huge pages procpool took {fmt_num(huge)} ns "
                      f"per item, {ratio(py, huge)} faster than Python.")
        elif huge:
            s += (f" procpool's repeat in the huge-page run of the same case took {fmt_num(huge)} "
                  f"ns per item ({ratio(py, huge)} faster than Python); a warm call maps no fresh "
                  f"pages at this size, so the difference is mostly this shared machine's noise.")
        parts.append(s)
    parts.append("Python spends its time pickling and unpickling in its parent, procpool in its "
                 "data path (above) and in fresh pages for its result.")
    return " ".join(parts)


# Goals measured against the floor (bench/floor_pool.hpp): what a fork +
# shared-memory pool with no encoding and no safety does on the same machine.
FLOOR_TINY_N = 10**6
CHUNK_GOALS_NS = {100: 5, 10: 25, 1: 600}


def floor_note(pp, fl, unit, difference="procpool's data path (above)"):
    """What the floor took beside procpool's `pp`, for a missed goal."""
    if fl is None:
        return None
    return (f"The floor (`bench/floor_pool.hpp`: one `memcpy` in, chunks claimed from a shared "
            f"counter, one `memcpy` out, no encoding, no crash detection) took {fmt_num(fl)} "
            f"{unit} in the same run, procpool {fmt_num(pp)} ({ratio(pp, fl)}). The difference is "
            f"{difference}.")


def floor_goals(R):
    """Tiny items within 1.5× of the floor; time per item at small chunk sizes;
    the distance from Python at chunk sizes of 10 and more. Each only where measured."""
    g = []
    n = FLOOR_TINY_N
    pp, fl = R.per_item_ns("tiny", "procpool", n), R.per_item_ns("tiny", "floor", n)
    if pp is not None and fl is not None:
        met = pp / fl <= 1.5
        g.append({"name": "Tiny items: slower than the floor by at most", "target": "≤ 1.5×",
                  "measured": f"{ratio(pp, fl)} at n = {md_pow10(n)} ({fmt_num(pp)} against "
                              f"{fmt_num(fl)} ns per item)",
                  "met": met, "why": None if met else floor_note(pp, fl, "ns per item")})
    for c, target in CHUNK_GOALS_NS.items():
        pp = R.per_item_ns("chunks", "procpool", c)
        if pp is None:
            continue
        fl = R.per_item_ns("chunks", "floor", c)
        met = pp <= target
        g.append({"name": f"Chunk size {c}: time per item", "target": f"≤ {target} ns",
                  "measured": f"{fmt_num(pp)} ns" + (f" (floor: {fmt_num(fl)} ns)" if fl else ""),
                  "met": met, "why": None if met else floor_note(
                      pp, fl, "ns per item",
                      "procpool's cost per chunk, where the floor's is two atomic additions: a "
                      "frame each way, encoded and copied through the rings, and a wake-up "
                      "whenever a worker has gone to sleep between frames")})
    speed = [(c, R.per_item_ns("chunks", "py_pool", c), R.per_item_ns("chunks", "procpool", c))
             for c in R.xs("chunks", "procpool") if c >= 10]
    speed = [(c, py, pp) for c, py, pp in speed if py and pp]
    if speed:
        met = all(py / pp >= 50 for _, py, pp in speed)
        g.append({"name": "Chunk size 10 and more: faster than Python's `Pool.map`",
                  "target": "≥ 50×",
                  "measured": ", ".join(f"{ratio(py, pp)} at {int(c):,}" for c, py, pp in speed),
                  "met": met, "why": None})
    return g


def round_trip_floor_goal(R):
    """The round trip against 2 µs, with its 99th percentile and the floor's."""
    m, p99 = R.med("latency", "procpool", 2), R.med("latency", "procpool", 2, "p99")
    if m is None:
        return []
    fl, fl99 = R.med("latency", "floor", 2), R.med("latency", "floor", 2, "p99")
    measured = f"{m * 1e6:.1f} µs, p99 {p99 * 1e6:.1f} µs"
    if fl is not None:
        measured += f" (floor: {fl * 1e6:.2f} µs, p99 {fl99 * 1e6:.2f} µs)"
    met = m <= 2e-6
    why = None
    if not met and fl is not None:
        futex = R.med("latency", "futex", 1)
        why = floor_note(
            m * 1e6, fl * 1e6, "µs",
            "partly how the two wait: the floor's worker spins 2 µs before it sleeps and "
            "procpool's too (`pool_options::worker_spin`), so a round trip that follows the "
            "last at once finds the worker awake; one that finds it asleep pays a futex "
            "wake-up" +
            (f" (a futex ping-pong, two wake-ups, took {futex * 1e6:.1f} µs in the same run)"
             if futex else "") + "; the rest is procpool's frames and its future")
    return [{"name": "`submit(x).get()` round trip, median (p99 reported)", "target": "≤ 2 µs",
             "measured": measured, "met": met, "why": why}]


def goals(R, info, meta):
    """One dict per goal: name, target, measured, met (None when not
    measured), and `why`, what the remaining cost is made of, where missed."""
    g = []
    sizes = [x for x in R.xs("tiny", "procpool") if x >= 10**6]
    if sizes:
        speed = [(x, R.per_item_ns("tiny", "py_pool_default", x), R.per_item_ns("tiny", "procpool", x),
                  R.per_item_ns("tiny", "threads", x)) for x in sizes]
        met = all(py and pp and py / pp >= 80 for _, py, pp, _ in speed)
        g.append({
            "name": "Tiny items: faster than Python's `Pool.map` with default chunks",
            "target": "≥ 80×",
            "measured": ", ".join(f"{ratio(py, pp)} at n = {md_pow10(x)}" for x, py, pp, _ in speed),
            "met": met,
            "why": None if met else tiny_python_why(R, speed),
        })
        met = all(pp and th and pp / th <= 3 for _, _, pp, th in speed)
        why = None
        if not met:
            parts = []
            fault_us = fault_cost_us(R)
            for x in sizes:
                b = tiny_breakdown(R, x)
                if not (b["pp"] and b["th"]):
                    continue
                s = (f"At n = {md_pow10(x)} procpool takes {fmt_num(b['pp'])} ns per item, the "
                     f"thread pool {fmt_num(b['th'])}. Making the result vector alone (a new, "
                     f"zeroed `std::vector<int64_t>(n)` in the allocator's own pages; `map` returns a new "
                     f"vector too, reserved in huge pages) costs "
                     f"{fmt_num(b['alloc'])} ns per item in the same run")
                if b["pp_faults"]:
                    s += (f"; a `map` call took {b['pp_faults']:,.0f} page faults in the parent "
                          f"(a fresh page on first touch")
                    if fault_us:
                        s += f", about {fault_us:.1f} µs each on this VM"
                    s += ")"
                s += "."
                if b["huge"] and b["pp_faults"]:
                    s += (f" With glibc's allocator backing memory with 2 MiB pages "
                          f"(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, same run) procpool takes "
                          f"{fmt_num(b['huge'])} ns per item, {ratio(b['huge'], b['th'])} the "
                          f"thread pool.")
                elif b["huge"]:
                    s += (f" procpool's repeat in the huge-page run took {fmt_num(b['huge'])} ns "
                          f"per item ({ratio(b['huge'], b['th'])} the thread pool); a warm call "
                          f"maps no fresh pages at this size, so the two differ by this machine's "
                          f"noise, not page faults.")
                parts.append(s)
            parts.append(
                "What is left is procpool's data path (above): a `perf` profile of this case "
                "(cpu-clock sampling: this VM exposes no hardware counters) finds the parent in "
                "`memmove` and `memset` and the workers partly idle, waiting for it.")
            why = " ".join(parts)
        g.append({
            "name": "Tiny items: slower than the thread pool by at most",
            "target": "≤ 3×",
            "measured": ", ".join(f"{ratio(pp, th)} at n = {md_pow10(x)}" for x, _, pp, th in speed),
            "met": met,
            "why": why,
        })
    g += floor_goals(R)
    m = R.med("latency", "procpool", 2)
    if m is not None:
        futex = R.med("latency", "futex", 1)
        met = m <= 20e-6
        g.append({
            "name": "`submit(x).get()` round trip, median",
            "target": "≤ 20 µs",
            "measured": f"{m * 1e6:.1f} µs" + (f" (futex ping-pong: {futex * 1e6:.1f} µs)"
                                                if futex else ""),
            "met": met,
            "why": None if met else (
                f"A round trip in which both sides sleep (the futex ping-pong) took "
                f"{futex * 1e6:.1f} µs in the same run: when procpool's worker has fallen asleep "
                f"before the next task arrives, each round trip pays those wake-ups."
                if futex else None),
        })
    g += round_trip_floor_goal(R)
    s, p, t = R.med("cpu", "serial", 1), R.med("cpu", "procpool", 2), R.med("cpu", "threads", 2)
    if s and p:
        met = s / p >= 1.97
        why = None
        loads = meta["loads"]
        r = R.get("cpu", "serial", 1)
        # Default chunks of ceil(tasks / 8) tasks for 2 workers.
        chunk_ms = math.ceil(r["items"] / 8) * r["task_ms"][0]
        if not met and t and p / t <= 1.03:
            why = (f"procpool did as well as the thread pool, which moves no data between "
                   f"processes at all ({ratio(s, p)} against {ratio(s, t)} over serial, same "
                   f"chunks, same run): the shortfall is shared, so it is the machine's, not procpool's. Two "
                   f"workers need both CPUs to themselves for 2×, and other processes used part "
                   f"of them during this run (1-minute load average {loads[0]:.2f} at the start, "
                   f"{max(loads):.2f} at most; see *Machine*).")
        elif not met and t:
            why = (f"The thread pool reached {ratio(s, t)} over serial with the same chunks in "
                   f"the same run; procpool took {ratio(p, t)} its time. procpool's own cost per "
                   f"chunk (a frame each way, a wake-up) is microseconds against chunks of "
                   f"{chunk_ms:g} ms, so a difference this large points to the machine's noise between "
                   f"the two measurements (they run one after the other), and is worth measuring "
                   f"again.")
            if s / t < 1.9:
                why += (f" The thread pool fell short of 2× too: other processes used part of the "
                        f"CPUs during this run (1-minute load average {loads[0]:.2f} at the "
                        f"start, {max(loads):.2f} at most; see *Machine*).")
        g.append({"name": "CPU-bound tasks, 2 workers: speedup over serial", "target": "≥ 1.97×",
                  "measured": ratio(s, p), "met": met, "why": why})
    size = 8 << 20
    gib = R.gib_s("big", "procpool", size)
    if gib:
        met = gib >= 3
        why = None
        if not met:
            t = R.med("big", "procpool", size)
            pf = R.med("big", "procpool", size, "parent_faults")
            wf = R.med("big", "procpool", size, "worker_faults")
            ft = R.gib_s("big", "first_touch", size)
            mc = R.gib_s("big", "memcpy", size)
            huge = R.gib_s("big", "procpool@hugetlb", size)
            fault_us = fault_cost_us(R)
            parts = []
            if pf is not None and wf is not None and (pf or wf):
                r = R.get("big", "procpool", size)
                pages = r["bytes"][0] / 4096  # the results' 4 KiB pages
                which = ("every page of every result" if pf >= 0.9 * pages else
                         f"for results spanning {pages:,.0f} pages: the allocator reused most")
                s = f"One call took {pf:,.0f} page faults in the parent ({which}) and {wf:,.0f} "
                if wf >= 0.5 * pages:
                    s += (f"in the workers (about {wf / pages:.1f} per page of input: every page "
                          f"of the decoded item and of the function's copy of it, allocated "
                          f"afresh for each item).")
                else:
                    s += ("in the workers (they keep the memory they freed, "
                          "`pool_options::worker_keep_memory`, and decode each item into it).")
                if ft and fault_us:
                    s += (f" Copying into fresh pages runs at {ft:.2f} GiB/s on this VM (same run: "
                          f"about {fault_us:.1f} µs per 4 KiB page), below the goal on its own; "
                          f"at that cost the faults come to about {pf * fault_us / 1e6:.2f} s in "
                          f"the parent and {wf * fault_us / 1e6:.2f} s of the workers' time (two "
                          f"workers, in parallel) of the call's {t:.2f} s.")
                parts.append(s)
            if huge:
                parts.append(f"With glibc's allocator backing memory with 2 MiB pages (same run) "
                             f"procpool reaches {huge:.2f} GiB/s.")
            parts.append(
                "What remains is the data path (above), where `memcpy` runs at "
                f"{fmt_num(mc)} GiB/s: for an 8 MiB item, two passes over every byte in the "
                "parent (the item copied from the input into the ring on the way out, the "
                "result decoded from the ring on the way back), each through the 1 MiB rings "
                "in pieces, the two sides taking turns; the workers make four of their own "
                "(decoding the item from the ring, the function's copy, encoding the result, "
                "copying it into the ring), on the same two cores.")
            why = " ".join(parts)
        g.append({"name": "Big items (8 MiB): identity `map` throughput", "target": "≥ 3 GiB/s",
                  "measured": f"{gib:.2f} GiB/s", "met": met, "why": why})
    if gib:
        ft = R.gib_s("big", "first_touch", size)
        py = max([v for v in (R.gib_s("big", "py_pool_default", size),
                              R.gib_s("big", "py_pool_tuned", size)) if v] or [0])
        if ft:
            met = gib >= 0.5 * ft
            g.append({"name": "Big items (8 MiB): throughput against copying into fresh pages",
                      "target": "≥ 50 %",
                      "measured": f"{100 * gib / ft:.0f} % ({gib:.2f} against {ft:.2f} GiB/s)",
                      "met": met, "why": None if met else (
                          "The parent still makes several passes over each item (see the goal "
                          "above): encoding it, putting it through the 1 MiB ring in pieces, and "
                          "gathering and decoding each result; copying into fresh pages is one "
                          "pass.")})
        if py:
            met = gib >= 5 * py
            g.append({"name": "Big items (8 MiB): faster than Python's `Pool.map` (its best)",
                      "target": "≥ 5×", "measured": f"{gib / py:.1f}× ({gib:.2f} against "
                                                     f"{py:.2f} GiB/s)",
                      "met": met, "why": None})
    n = 10**7
    into, mapped = R.per_item_ns("tiny", "procpool_into", n), R.per_item_ns("tiny", "procpool", n)
    if into is not None:
        faults = R.med("tiny", "procpool_into", n, "parent_faults")
        pages = n * 8 / 4096
        met = faults is not None and faults <= 0.01 * pages
        g.append({"name": f"`map_into` at {md_pow10(n)} items: page faults in the parent per "
                          f"repeated call", "target": "none (< 1 % of the results' pages)",
                  "measured": (f"{faults:,.0f} for {pages:,.0f} pages; {fmt_num(into)} ns per "
                               f"item" + (f" against `map`'s {fmt_num(mapped)}" if mapped else "")),
                  "met": met, "why": None})
    m = R.med("startup", "procpool", 2)
    if m is not None:
        met = m <= 3e-3
        floor = R.med("startup", "fork", 2)
        why = None
        if not met and floor:
            why = (f"Forking two children that exit at once, and reaping them, took "
                   f"{ms(floor)} in the same run (median, interleaved with the pools): this VM's "
                   f"`fork` and its page faults (a child's first writes copy pages) put the "
                   f"floor {'above' if floor > 3e-3 else 'close to'} the goal. procpool adds "
                   f"{ms(m - floor)}: mapping the rings (1 MiB each way per worker), each worker's "
                   f"set-up (parent-death signal, its first page faults), and at the end a stop "
                   f"frame, the wait for each worker's exit through its pidfd, and the unmapping.")
        g.append({"name": "Pool start + stop, 2 workers", "target": "≤ 3 ms",
                  "measured": ms(m) + (f" (bare fork + exit + reap: {ms(floor)})" if floor else ""),
                  "met": met, "why": why})
    ns = R.xs("imap", "procpool")
    if ns:
        peaks = [R.med("imap", "procpool", n, "peak_rss_kib") / 1024 for n in ns]
        growth = peaks[-1] - peaks[0]
        met = max(peaks) < 64 and growth < 4
        g.append({"name": "`imap` over a lazy input: parent's peak RSS, flat and small",
                  "target": "< 64 MiB, flat",
                  "measured": f"{peaks[-1]:.1f} MiB at {md_pow10(ns[-1])} items, {growth:+.1f} MiB "
                              f"from {md_pow10(ns[0])}",
                  "met": met, "why": None})
    return g


IMPL_NAMES = {
    "procpool": "procpool `map`",
    "procpool_into": "procpool `map_into`, into a vector kept across calls",
    "procpool@hugetlb": "procpool `map`, glibc malloc on huge pages",
    "floor": "the floor: fork + shared memory, no encoding, no safety",
    "floor_into": "the floor, into a vector made once",
    "alloc": "new `vector<int64_t>(n)` alone",
    "alloc@hugetlb": "new `vector<int64_t>(n)`, huge pages",
    "serial": "serial C++ loop",
    "threads": "thread pool (2 `std::thread`s)",
    "py_pool_default": "Python `Pool.map`, default chunks",
    "py_pool_tuned": "Python `Pool.map`, tuned chunks",
    "py_executor": "Python `ProcessPoolExecutor.map`, chunksize ⌈n/8⌉",
    "py_executor_default": "Python `ProcessPoolExecutor.map`, default chunksize (1)",
}


def machine_section(add, info, meta):
    add("## Machine")
    add("")
    loads = meta["loads"]
    cpu = info["cpu"]
    if info.get("hypervisor"):
        cpu += f" ({info['hypervisor']} guest)"
    elif info.get("virtualized"):
        cpu += " (virtual machine)"
    rows = [
        ("CPU", cpu),
        ("Cores", f"{info['cpus']} CPUs: {info['sockets']} socket × {info['cores_per_socket']} cores × "
                  f"{info['threads_per_core']} thread(s); {info['affinity']} usable by this process"),
        ("Memory", f"{info['mem_gib']:.1f} GiB; transparent huge pages: `{info.get('thp', '?')}`"),
        ("Kernel", f"Linux {info['kernel']}, {info.get('glibc', '?')}"),
        ("Compiler", f"{info['compiler']}, CMake build type {info['build_type']}"),
        ("Python", f"{info['python']} (`{info['python_cmd']}`), `multiprocessing` start method `fork`"),
        ("procpool", f"commit {info['commit']}"),
        ("Load average (1 min)", f"**{loads[0]:.2f} at the start**, {max(loads):.2f} at most between "
                                 f"cases, {loads[-1]:.2f} at the end"),
    ]
    add(table(["", ""], rows, left=2))
    add("")
    busy = meta.get("busy_start", [])
    others = ", ".join(f"`{c}` ({share:.0%} of a CPU{', nice ' + str(n) if n else ''})"
                       for c, _, share, n in busy)
    add(f"**This machine is shared, and the figures are noisy.** Other work ran on its "
        f"{info['cpus']} CPUs during this run (1-minute load average {loads[0]:.2f} when it "
        f"started, {max(loads):.2f} at most)" + (f"; at the start: {others}" if others else "") +
        ". Every comparison on this page is between implementations measured in the same run, "
        "one after the other, so each saw much the same machine; still, a figure that depends on "
        "having both CPUs (speedups, throughput) or on a prompt wake-up (latency, small maps) may "
        "be worse than on a quiet machine, and runs differ by tens of percent.")
    add("")
    if meta["mode"] == "quick":
        add("Medians of one to three repetitions; a repetition of a short call repeats the "
            "call for at least 20 ms and counts the time per call.")
    else:
        add("Medians of several repetitions throughout (five to seven; three for a call longer "
            "than a second); a repetition of a short call repeats the call for at least 50 ms and "
            "counts the time per call.")
    add("")


def section_tiny(add, R, info):
    """Section 1. Tiny items."""
    add("## 1. Tiny items")
    add("")
    add("`map` of *n* `int`s through `x*x` (64-bit results) on a warm 2-worker pool, beside a "
        "serial loop, a pool of 2 `std::thread`s that split the same vectors into chunks of "
        "⌈n/8⌉ and write into a result vector made once, " +
        ("the floor (below), " if R.xs("tiny", "floor") else "") +
        "and Python's pools with 2 workers. "
        "Python's default chunk size with 2 workers is ⌈n/8⌉; its tuned chunk size is the "
        "fastest of a few candidates (1024 … 65536, ⌈n/32⌉ and the default) timed in the same "
        "run. `ProcessPoolExecutor.map` runs with chunksize ⌈n/8⌉ at every *n*, and with its "
        "default chunksize of 1 only where noted: it sends each item on its own.")
    add("")
    if R.xs("tiny", "floor"):
        add(FLOOR_TEXT + " Here it uses procpool's default chunks (⌈n/8⌉); *the floor* returns "
            "a new `std::vector<int64_t>` as `map` does, *into a vector made once* writes into "
            "the same vector at every call.")
        add("")
    impls = ["procpool", "procpool_into", "floor", "floor_into", "alloc", "serial", "threads", "py_pool_default",
             "py_pool_tuned", "py_executor", "py_executor_default", "procpool@hugetlb",
             "alloc@hugetlb"]
    ns = R.xs("tiny", "procpool")
    rows = []
    for impl in impls:
        if not any(R.get("tiny", impl, n) for n in ns):
            continue
        row = [IMPL_NAMES[impl]]
        for n in ns:
            v = R.per_item_ns("tiny", impl, n)
            cell = fmt_num(v)
            if impl == "py_pool_tuned" and v is not None:
                cell += f" ({int(R.get('tiny', impl, n)['chunksize'][0]):,})"
            row.append(cell)
        rows.append(row)
    for label, a, b in [("Python `Pool.map` default ÷ procpool", "py_pool_default", "procpool"),
                        ("Python `Pool.map` tuned ÷ procpool", "py_pool_tuned", "procpool"),
                        ("procpool ÷ thread pool", "procpool", "threads"),
                        ("procpool ÷ floor", "procpool", "floor"),
                        ("procpool `map_into` ÷ floor into a kept vector", "procpool_into",
                         "floor_into")]:
        rows.append([f"*{label}*"] + [ratio(R.per_item_ns("tiny", a, n), R.per_item_ns("tiny", b, n))
                                      for n in ns])
    add(table(["ns per item, n ="] + [md_pow10(n) for n in ns], rows))
    add("")
    add("Tuned chunk sizes in parentheses. The rows *new `vector<int64_t>(n)` alone* measure what "
        "any call that returns a new result vector pays before a single item moves; the *huge "
        "pages* rows repeat procpool and that allocation with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` "
        "(glibc's allocator asks for transparent huge pages), to separate this VM's cost of "
        "mapping fresh memory from procpool's own.")
    add("")
    fault_rows = []
    for n in ns:
        pf = R.med("tiny", "procpool", n, "parent_faults")
        wf = R.med("tiny", "procpool", n, "worker_faults")
        af = R.med("tiny", "alloc", n, "parent_faults")
        if pf is not None:
            fault_rows.append([md_pow10(n), f"{pf:,.0f}", f"{wf:,.0f}" if wf is not None else "—",
                               f"{af:,.0f}" if af is not None else "—"])
    if fault_rows:
        add("Page faults during one warm call (from `/proc/PID/stat`):")
        add("")
        add(table(["n", "procpool parent", "procpool workers", "new vector alone"], fault_rows))
        add("")
    add("![ns per item against n](img/bench-tiny.png)")
    add("")


def section_chunks(add, R, info):
    """Section 2. Chunk size."""
    add("## 2. Chunk size")
    add("")
    r = R.get("chunks", "procpool", 1)
    n_items = int(r["items"]) if r else 0
    add(f"The same map over {md_pow10(n_items)} items with a fixed chunk size, 2 workers. Python "
        "runs fewer items when its chunks are small (a chunk of one item costs it tens of "
        "microseconds), as given in the table; every figure is per item. At chunk size 1 every "
        "item is a frame of its own, a frame each way per item. Each worker holds two frames at "
        "first, and more (up to 256) once the pool has seen that its chunks are short, enough "
        "for about 50 µs of work, so that a worker woken from sleep finds a batch waiting.")
    add("")
    if R.xs("chunks", "floor"):
        add(FLOOR_TEXT + " Here it takes the same chunk size, over the same items.")
        add("")
    rows = []
    for c in R.xs("chunks", "procpool"):
        pp = R.per_item_ns("chunks", "procpool", c)
        fl = R.per_item_ns("chunks", "floor", c)
        py = R.per_item_ns("chunks", "py_pool", c)
        pyr = R.get("chunks", "py_pool", c)
        rows.append([f"{int(c):,}", fmt_num(pp), fmt_num(fl), ratio(pp, fl), fmt_num(py),
                     f"{int(pyr['items']):,}" if pyr else "—", ratio(py, pp)])
    add(table(["chunk size", "procpool ns/item", "floor ns/item", "procpool ÷ floor",
               "Python `Pool.map` ns/item", "Python items", "Python ÷ procpool"], rows))
    add("")
    add("![ns per item against chunk size](img/bench-chunks.png)")
    add("")


def section_cpu(add, R, info):
    """Section 3. CPU-bound tasks."""
    add("## 3. CPU-bound tasks")
    add("")
    s = R.get("cpu", "serial", 1)
    tasks = int(s["items"]) if s else 0
    task_ms = s["task_ms"][0] if s else 0
    add(f"{tasks} tasks of {task_ms:g} ms of computation each (a fixed loop of dependent integer "
        "steps, its length calibrated at start-up; the same loop in Python, calibrated the same "
        "way, so a Python task also burns its CPU time). Default chunks. Speedup is over the "
        "serial loop of the same language. This machine has "
        f"{info['cpus']} CPUs: 4 workers oversubscribe it, and the ideal there is still "
        f"{info['cpus']}×.")
    add("")
    cs, ps = R.med("cpu", "serial", 1), R.med("cpu", "py_serial", 1)
    rows = [["serial loop", f"{fmt_num(cs)} s", f"{fmt_num(cs)} s", f"{fmt_num(ps)} s"]]
    for w in R.xs("cpu", "procpool"):
        a, b, c = R.med("cpu", "procpool", w), R.med("cpu", "threads", w), R.med("cpu", "py_pool", w)
        rows.append([f"{int(w)} worker{'s' if w > 1 else ''}", f"{fmt_num(a)} s ({ratio(cs, a)})",
                     f"{fmt_num(b)} s ({ratio(cs, b)})", f"{fmt_num(c)} s ({ratio(ps, c)})"])
    add(table(["", "procpool (speedup)", "thread pool (speedup)", "Python `Pool.map` (speedup)"],
              rows))
    add("")
    add("![speedup against workers](img/bench-cpu.png)")
    add("")


def section_latency(add, R, info):
    """Section 4. Round-trip latency."""
    add("## 4. Round-trip latency")
    add("")
    add("One small task there and its result back, waited for before the next. procpool: "
        "`pool.submit(x).get()` on a 2-worker pool. Beside it, measured by the same C++ program, "
        "round trips in which each side sleeps in the kernel until woken: two processes taking "
        "turns on a futex word, and an `int` through two OS pipes. procpool's parent spins for up "
        "to 20 µs before it sleeps and an idle worker watches its ring for 2 µs "
        "(`pool_options::worker_spin`), so a quick answer or a quick next task costs no wake-up: procpool can come in under these "
        "on an idle machine, and meets them on a busy one.")
    add("")
    if R.xs("latency", "floor"):
        add(FLOOR_TEXT + " Here its `call(x)`: the parent writes x into the shared input, wakes a "
            "worker if none is awake, and waits for the done counter.")
        add("")
    lat = [("procpool", "procpool `submit(x).get()`"),
           ("floor", "the floor's `call(x)`, 2 workers"),
           ("py_apply_async", "Python `Pool.apply_async(f, (x,)).get()`"),
           ("py_executor", "Python `ProcessPoolExecutor.submit(f, x).result()`"),
           ("futex", "futex ping-pong between two processes"),
           ("pipe", "pipe ping-pong between two processes")]
    base = R.med("latency", "procpool", 2)
    rows = []
    for impl, name in lat:
        x = R.xs("latency", impl)
        if not x:
            continue
        m, p99 = R.med("latency", impl, x[0]), R.med("latency", impl, x[0], "p99")
        rows.append([name, f"{m * 1e6:.1f}", f"{p99 * 1e6:.1f}", ratio(m, base)])
    ratios = [ratio(R.med("latency", "procpool", 2, f), R.med("latency", "floor", 2, f))
              for f in ("samples", "p99")]
    rows.append(["*procpool ÷ floor*"] + ratios + [""])
    add(table(["", "median µs", "p99 µs", "÷ procpool"], rows))
    add("")
    add("Median and 99th percentile of each repetition's round trips; the medians of those "
        "over the repetitions.")
    add("")
    add("![round trip](img/bench-latency.png)")
    add("")


def section_big(add, R, info):
    """Section 5. Big items."""
    add("## 5. Big items")
    add("")
    sizes = R.xs("big", "procpool")
    if sizes:
        size = sizes[0]
        r = R.get("big", "procpool", size)
        count = int(r["items"])
        add(f"Identity `map` over {count} items of {int(size) >> 20} MiB (`std::vector<char>` in "
            "C++, `bytes` in Python), 2 workers: throughput is the bytes of the input divided by "
            "the time of the call (each byte goes to a worker and comes back). Beside it, in the "
            "same run: `memcpy` of the same items into buffers already mapped (the machine's copy "
            "bandwidth), and copying them into freshly mapped memory (the kernel maps and zeroes "
            "each 4 KiB page on its first touch: what any new result costs).")
        add("")
        big = [("procpool", "procpool `map`"),
               ("procpool@hugetlb", "procpool `map`, glibc malloc on huge pages"),
               ("py_pool_default", "Python `Pool.map`, default chunks"),
               ("py_pool_tuned", "Python `Pool.map`, chunksize 1"),
               ("memcpy", "`memcpy`, destination mapped"),
               ("first_touch", "copy into fresh pages")]
        mc = R.gib_s("big", "memcpy", size)
        pp = R.gib_s("big", "procpool", size)
        rows = []
        for impl, name in big:
            gib = R.gib_s("big", impl, size)
            if gib is None:
                continue
            pf = R.med("big", impl, size, "parent_faults")
            wf = R.med("big", impl, size, "worker_faults")
            rows.append([name, fmt_num(R.med("big", impl, size)), f"{gib:.2f}",
                         f"{100 * gib / mc:.0f}%" if mc else "—",
                         ratio(pp, gib) if impl.startswith("py") else "",
                         f"{pf:,.0f}" if pf is not None else "",
                         f"{wf:,.0f}" if wf is not None else ""])
        add(table(["", "s per call", "GiB/s", "of memcpy", "procpool ÷ this",
                   "page faults, parent", "page faults, workers"], rows))
        add("")
        fault_us = fault_cost_us(R)
        if fault_us:
            add(f"On this VM a first touch of a 4 KiB page, with its share of the copy, costs "
                f"about {fault_us:.1f} µs (copy into fresh pages ÷ its page faults); a bare-metal "
                "machine takes a fraction of a microsecond. The *glibc malloc on huge pages* row "
                "repeats procpool's map with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`: glibc's "
                "allocator then asks for transparent huge pages for the `std::vector`s the "
                "parent and the workers allocate, one fault per 2 MiB.")
            add("")
        add("![GiB/s](img/bench-big.png)")
        add("")


def section_startup(add, R, info):
    """Section 6. Start-up."""
    add("## 6. Start-up")
    add("")
    add("Constructing a pool and destroying it (procpool: the constructor forks the workers, the "
        "destructor sends stop frames and reaps them; Python: `Pool(w)`, `close()`, `join()`), "
        "and the same with one task run in between (the first result: every worker is really "
        "up). The floor, measured by the same program, interleaved with the pools: `fork` of as "
        "many children, each calling `_exit(0)` at once, and `waitpid` for each. The parent is "
        "a small process here; `fork` costs more in a large one.")
    add("")
    rows = []
    for w in R.xs("startup", "procpool"):
        v = [R.med("startup", i, w) for i in ("fork", "procpool", "procpool_first", "py_pool",
                                              "py_pool_first")]
        rows.append([int(w)] + [f"{x * 1e3:.2f}" if x is not None else "—" for x in v] +
                    [ratio(v[3], v[1])])
    add(table(["workers", "bare fork + exit + reap, ms", "procpool ms",
               "procpool + first result ms", "Python ms", "Python + first result ms",
               "Python ÷ procpool"], rows))
    add("")
    add("![start-up](img/bench-startup.png)")
    add("")


def section_imap(add, R, info):
    """Section 7. Bounded memory."""
    add("## 7. Bounded memory: `imap` over a lazy input")
    add("")
    cxx_ns, py_ns = R.xs("imap", "procpool"), R.xs("imap", "py_pool")
    fewer = ""
    if cxx_ns and py_ns and max(py_ns) < max(cxx_ns):
        fewer = (f" Python runs up to {md_pow10(max(py_ns))} items in this run, procpool up to "
                 f"{md_pow10(max(cxx_ns))}.")
    add("`imap` of `x*x` over the numbers 0 … n−1 made one at a time (C++: an input iterator "
        "with no size; Python: a generator), each result checked as it is consumed, 2 workers. "
        "Peak RSS of the parent only (`getrusage(RUSAGE_SELF).ru_maxrss`), each size in a fresh "
        "process; *before* is the peak once the pool is up, before the first item. Python's "
        "`imap` gets chunksize 4096 (procpool's imap grows its chunks to 4096 on an input of "
        "unknown length; Python's default of 1 would take hours here)." + fewer)
    add("")
    rows = []
    for impl, name in (("procpool", "procpool `imap`"), ("py_pool", "Python `Pool.imap`")):
        for n in R.xs("imap", impl):
            rr = R.get("imap", impl, n)
            b, p = rr["base_rss_kib"][0] / 1024, rr["peak_rss_kib"][0] / 1024
            rows.append([name, md_pow10(n), f"{rr['samples'][0]:.2f}",
                         fmt_num(rr["samples"][0] / n * 1e9), f"{b:.1f}", f"{p:.1f}",
                         f"{p - b:+.1f}"])
    add(table(["", "items", "s", "ns/item", "RSS before, MiB", "peak RSS, MiB", "growth, MiB"], rows))
    add("")
    add("![peak RSS against items](img/bench-imap.png)")
    add("")


HEAVY_NAMES = {1: "2 `submit`s of 300 ms, 2 workers",
               2: "`map` of 4 × 300 ms, chunk 1, 4 workers",
               3: "`map` of 8 × 300 ms, chunk 2, 4 workers",
               4: "`map` of one 400 ms task, then 4 × 100 ms, chunk 1, 2 workers"}


def section_heavy(add, R, info):
    """Section 8. A few heavy tasks: is the scheduling work-conserving?"""
    add("## 8. A few heavy tasks")
    add("")
    add("Few tasks, each long: the time is decided by which worker gets which task, not by "
        "copying. The tasks sleep, so that 4 workers overlap on any number of cores. *Ideal* is "
        "what a scheduler that never leaves a worker idle while a task waits reaches; Python's "
        "pool, whose workers pull tasks from one queue, is the reference.")
    add("")
    rows = []
    for x in R.xs("heavy", "procpool"):
        a, p = R.med("heavy", "procpool", x), R.med("heavy", "py_pool", x)
        rr = R.get("heavy", "procpool", x)
        ideal = rr["ideal_s"][0] if rr and "ideal_s" in rr else None
        rows.append([HEAVY_NAMES.get(int(x), str(x)),
                     f"{fmt_num(ideal)} s" if ideal else "?",
                     f"{fmt_num(a)} s" + (f" ({a / ideal:.2f}× ideal)" if ideal else ""),
                     f"{fmt_num(p)} s" + (f" ({p / ideal:.2f}× ideal)" if ideal and p else "")])
    add(table(["", "ideal", "procpool", "Python `Pool`"], rows))
    add("")


def section_async(add, R, info):
    """Section 9. Asynchronous tasks: many submits, then one wait; callbacks."""
    add("## 9. Asynchronous tasks")
    add("")
    add("The same function `x + 1` on a warm 2-worker pool, procpool and Python one after the "
        "other in the same run. *Submit, then wait for all*: procpool submits 1 000 tasks "
        "(`pool.submit(i)`), keeps the futures in a vector, waits for them with "
        "`procpool::wait(futures)` and reads each result with `get()`; Python calls "
        "`pool.apply_async(f, (i,))` 1 000 times, then `get()` on each. Every result is checked "
        "inside the timed call; the time is per task.")
    add("")
    rows = []
    base = None
    for impl, name in (("procpool", "procpool: 1 000 × `submit(i)`, `procpool::wait`, `get()`"),
                       ("py_apply_async", "Python: 1 000 × `Pool.apply_async(f, (i,))`, "
                                          "`get()` each")):
        x = R.xs("async", impl)
        if not x:
            continue
        m, ns = R.med("async", impl, x[0]), R.per_item_ns("async", impl, x[0])
        if impl == "procpool":
            base = ns
        rows.append([name, f"{m * 1e3:.2f}", fmt_num(ns), ratio(ns, base)])
    if rows:
        add(table(["", "ms per 1 000 tasks", "ns per task", "÷ procpool"], rows))
        add("")
    add("*Callback latency*: one task at a time, from before the submit to the caller awake, "
        "while the caller sleeps. procpool: `pool.submit(i).then(cb)`, the caller waits on a "
        "`std::condition_variable` (not on the future) that `cb` notifies from the pool's helper "
        "thread; Python: `pool.apply_async(f, (i,), callback=cb)`, the caller waits on a "
        "`threading.Event` that `cb` sets from the pool's result-handler thread. Each callback "
        "checks its value.")
    add("")
    rows = []
    base = R.med("async", "procpool_then", 2)
    lat = [("async", "procpool_then", "procpool `submit(x).then(cb)`, caller asleep"),
           ("async", "py_callback", "Python `Pool.apply_async(f, (x,), callback=cb)`, caller asleep"),
           ("latency", "procpool", "procpool `submit(x).get()` (section 4, for reference)")]
    for case, impl, name in lat:
        x = R.xs(case, impl)
        if not x:
            continue
        m, p99 = R.med(case, impl, x[0]), R.med(case, impl, x[0], "p99")
        rows.append([name, f"{m * 1e6:.1f}", f"{p99 * 1e6:.1f}", ratio(m, base)])
    if rows:
        add(table(["", "median µs", "p99 µs", "÷ procpool `then`"], rows))
        add("")
    note = ("Median and 99th percentile of each repetition's round trips; the medians of those "
            "over the repetitions.")
    share = R.med("async", "procpool_then", 2, "inline_share")
    if share:
        note += (f" In {share:.1%} of procpool's round trips the task was over before `then` was "
                 f"called, and the callback ran at once in the calling thread.")
    add(note)
    add("")


def page(R, info, meta):
    L = []
    add = L.append
    quick = meta["mode"] == "quick"
    add("# Benchmarks")
    add("")
    if quick:
        add("> **A quick run** (`--quick`): fewer items and repetitions. Not the committed figures.")
        add("")
    add("procpool beside Python's `multiprocessing` (what a user would otherwise reach for) and "
        "beside the limits of the machine (serial C++, a thread pool over the same data with no "
        "copies, the floor of a fork + shared-memory pool, `memcpy`, a futex and a pipe "
        "ping-pong between two processes, a bare `fork`). "
        "Every number on this page comes from one run of one command, on the machine described "
        "below; every case runs procpool and its comparators in the same run, one after the "
        "other. Each benchmark checks its results and fails on a wrong one, so a fast wrong "
        "answer cannot appear here.")
    add("")
    add(f"Produced by `{meta['command']}` on {meta['date']}, in {meta['duration'] / 60:.1f} min.")
    add("")
    machine_section(add, info, meta)

    add("## Goals")
    add("")
    add("Where procpool stands against the goals set for a 2-core machine. Timings are reported, "
        "never asserted: a missed goal fails nothing.")
    add("")
    gs = goals(R, info, meta)
    rows = [(x["name"], x["target"], x["measured"],
             "met" if x["met"] else "**not met**") for x in gs]
    add(table(["goal", "target", "measured", ""], rows, left=4))
    add("")
    missed = [x for x in gs if not x["met"] and x["why"]]
    if missed:
        add("### Where a goal is missed, what the remaining cost is made of")
        add("")
        add("*procpool's data path, as the code stands* (`include/procpool/detail/engine/fork_engine.hpp`, "
            "`pool.hpp`). " + DATA_PATH)
        add("")
        for x in missed:
            add(f"**{x['name']}** ({x['target']}; measured {x['measured']}). {x['why']}")
            add("")

    sections = [("tiny", section_tiny), ("chunks", section_chunks), ("cpu", section_cpu),
                ("latency", section_latency), ("big", section_big), ("startup", section_startup),
                ("imap", section_imap), ("heavy", section_heavy), ("async", section_async)]
    for case, section in sections:
        if R.has(case):
            section(add, R, info)

    notes = meta.get("notes")
    if notes:
        add(notes.rstrip())
        add("")
    add("## Reproducing")
    add("")
    add("```sh")
    add("scripts/bench              # everything; writes this page and docs/img/bench-*.png")
    add("scripts/bench --wait 0     # the same without waiting for a quiet machine")
    add("scripts/bench --quick      # a reduced run in under 2 minutes; writes build/bench-quick/")
    add("scripts/bench tiny big     # some cases only")
    add("```")
    add("")
    add("`scripts/bench` waits (up to 40 minutes, `--wait MINUTES` to change) for the 1-minute "
        "load average to drop below 0.5 before a full run. The programs: `bench/pool_bench.cpp` "
        "(C++, `pool_bench --help`), `bench/python/pool_ref.py` (standard library only), "
        "`bench/run.py` (runs both, writes the page), `bench/plot.py` (the plots). The raw "
        f"results of this run are in `{meta.get('raw', 'build/bench/results.jsonl')}` (not "
        "committed); `bench/run.py --from-raw` writes the page again from them.")
    add("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced run (under 2 minutes)")
    ap.add_argument("--bench", required=True, help="the pool_bench executable")
    ap.add_argument("--python", default="python3", help="the Python to compare with")
    ap.add_argument("--out", required=True, help="directory of the page; plots go to OUT/img")
    ap.add_argument("--raw", required=True, help="file for the raw results (JSON lines)")
    ap.add_argument("--wait", type=float, default=0, help="minutes to wait for a quiet machine")
    ap.add_argument("--command", default="scripts/bench", help="the command to name in the page")
    ap.add_argument("--notes", help="a Markdown file appended to the page")
    ap.add_argument("--from-raw", action="store_true",
                    help="write the page from the raw results of an earlier run; measure nothing")
    ap.add_argument("cases", nargs="*", help=" ".join(CASES))
    args = ap.parse_args()
    args.cases = args.cases or CASES
    for c in args.cases:
        if c not in CASES:
            ap.error(f"no case named {c!r}")
    mode = "quick" if args.quick else "full"
    out, raw = Path(args.out), Path(args.raw)
    (out / "img").mkdir(parents=True, exist_ok=True)
    raw.parent.mkdir(parents=True, exist_ok=True)

    if args.from_raw:
        lines = raw.read_text().splitlines()
        meta = json.loads(lines[0])
        results = [json.loads(line) for line in lines[1:]]
        info = meta.pop("machine")
    else:
        if args.wait > 0:
            wait_for_quiet(args.wait, 0.5)
        info = machine_info(args.bench, args.python)
        busy_start = busy_processes()
        start = time.time()
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        hugetlb = hugetlb_usable()
        if not hugetlb:
            log("transparent huge pages or glibc.malloc.hugetlb unavailable: no huge-page runs")
        results, loads = run_all(args, mode, hugetlb)
        meta = {"mode": mode, "command": args.command, "loads": loads, "date": date,
                "duration": time.time() - start, "busy_start": busy_start,
                "busy_end": busy_processes()}
        with raw.open("w") as f:
            f.write(json.dumps(dict(meta, machine=info)) + "\n")
            for r in results:
                f.write(json.dumps(r) + "\n")
    meta["raw"] = os.path.relpath(raw, ROOT)
    if args.notes:
        meta["notes"] = Path(args.notes).read_text()
    R = Results(results)
    (out / "benchmarks.md").write_text(page(R, info, meta))
    log(f"wrote {out / 'benchmarks.md'}")
    plot = [sys.executable, str(ROOT / "bench" / "plot.py"), str(raw), str(out / "img")]
    if subprocess.run(plot).returncode != 0:
        log("plotting failed")
        sys.exit(1)
    for x in goals(R, info, meta):
        measured = re.sub(r"10<sup>(\d+)</sup>", r"10^\1", x["measured"])
        log(f"{'met    ' if x['met'] else 'NOT MET'} {x['name']}: {measured} (goal {x['target']})")


if __name__ == "__main__":
    main()
