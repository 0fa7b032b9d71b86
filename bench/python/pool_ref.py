#!/usr/bin/env python3
"""Python's multiprocessing and concurrent.futures on the cases of bench/pool_bench.cpp.

Standard library only. Prints one JSON object per line (with --json) in the
same shape as `pool_bench --json`: case, impl, x, items, samples (seconds per
call, one per repetition) and per-repetition extras. Every result is checked;
a wrong one exits with status 1.

Usage: pool_ref.py [--quick] [--validate] [--json] [--items N] [CASE...]
Cases: tiny chunks cpu latency big startup imap heavy async (default: all).
--validate runs the smallest sizes once and prints no timings: a correctness check.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import resource
import statistics
import sys
import threading
import time

# procpool forks its workers; so does multiprocessing's "fork" start method,
# the default on Linux up to Python 3.13. Name it, so that a newer Python
# measures the same thing.
CTX = multiprocessing.get_context("fork")

OPTS = None


def reps(full):
    if OPTS.validate:
        return 1
    return max(1, full // 2) if OPTS.quick else full


def sample_seconds():
    return 0 if OPTS.validate else 0.02 if OPTS.quick else 0.05


def fail(what):
    sys.stdout.flush()
    print(f"pool_ref: FAILED: {what}", file=sys.stderr)
    sys.exit(1)


def emit(case, impl, x, items, samples, **extras):
    rec = {"case": case, "impl": impl, "lang": "python", "x": x, "items": items,
           "samples": samples}
    rec.update(extras)
    if OPTS.json:
        print(json.dumps(rec))
    elif OPTS.validate:
        # A correctness check claims nothing about speed: no timings.
        print(f"{case:<8} {impl:<22} x={x:<10g} results checked")
    else:
        m = statistics.median(samples)
        per = f"  {m / items * 1e9:10.2f} ns/item" if items else ""
        more = "".join(f"  {k}={statistics.median(v):.4g}" for k, v in extras.items())
        print(f"{case:<8} {impl:<22} x={x:<10g} median {m:12.6f} s{per}{more}")
    sys.stdout.flush()


def warm_seconds():
    return 0 if OPTS.validate else 0.05 if OPTS.quick else 0.1


# A call longer than this is warm after its first run and gets at most three
# samples (as in pool_bench).
LONG_CALL_SECONDS = 1.0


def time_calls(n_reps, call, check, first=None):
    """As in pool_bench: at least three untimed calls and warm_seconds() of
    them (the first call's time goes to first[0]), then samples that repeat
    the call for sample_seconds() and record the time per call. A call longer
    than LONG_CALL_SECONDS is warm after its first run and gets at most three
    samples."""
    start = time.perf_counter()
    out = call()
    last = time.perf_counter() - start
    if first is not None:
        first.append(last)
    check(out)
    long_call = last > LONG_CALL_SECONDS
    calls = 1
    while (not OPTS.validate and not long_call
           and (calls < 3 or time.perf_counter() - start < warm_seconds())):
        t = time.perf_counter()
        out = call()
        last = time.perf_counter() - t
        calls += 1
    check(out)
    if long_call:
        n_reps = min(n_reps, 3)
    inner = 1
    if sample_seconds() > 0 and last > 0:
        inner = min(100000, max(1, int(sample_seconds() / last)))
    samples = []
    for _ in range(n_reps):
        t = time.perf_counter()
        for _ in range(inner):
            out = call()
        samples.append((time.perf_counter() - t) / inner)
        check(out)
    return samples


def ceil_div(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------
# Functions the workers run (module level, so that they pickle by name).

def square(x):
    return x * x


def inc(x):
    return x + 1


def identity(b):
    return b


MASK = (1 << 64) - 1


def burn(args):
    """A fixed computation of `iterations` dependent steps (the C++ one, in Python)."""
    seed, iterations = args
    x = (seed * 0x9E3779B97F4A7C15 + 1) & MASK
    for i in range(iterations):
        x ^= x >> 29
        x = (x * 0xBF58476D1CE4E5B9 + i) & MASK
    return x


# ---------------------------------------------------------------------------

def tiny_inputs(n):
    return list(range(-(n // 2), n - n // 2))


def checker(who, expected):
    def check(out):
        if out != expected:
            fail(f"{who}: wrong results")
    return check


def tune_chunksize(pool, xs, default):
    """The fastest chunk size for Pool.map over xs among a few candidates
    (Python's default included), one warm call each."""
    n = len(xs)
    candidates = sorted({default, 1024, 4096, 16384, 65536, ceil_div(n, 32)})
    candidates = [c for c in candidates if c <= default]
    best, best_time = default, None
    for c in candidates:
        t = time.perf_counter()
        pool.map(square, xs, c)
        elapsed = time.perf_counter() - t
        if best_time is None or elapsed < best_time:
            best, best_time = c, elapsed
    return best


# ProcessPoolExecutor.map with its default chunksize (1) sends every item on
# its own: tens of microseconds each. It runs up to this many items.
EXECUTOR_DEFAULT_MAX_ITEMS = 10_000


def bench_tiny():
    sizes = [10_000, 100_000, 1_000_000, 10_000_000]
    if OPTS.quick:
        sizes = [10_000, 100_000, 1_000_000]
    if OPTS.validate:
        sizes = [1_000, 100_000]
    n_reps = reps(5)
    workers = 2
    with CTX.Pool(workers) as pool:
        for n in sizes:
            xs = tiny_inputs(n)
            expected = [x * x for x in xs]
            default = ceil_div(n, 4 * workers)
            s = time_calls(n_reps, lambda: pool.map(square, xs), checker("Pool.map", expected))
            emit("tiny", "py_pool_default", n, n, s, chunksize=[default])
            tuned = tune_chunksize(pool, xs, default)
            s = time_calls(n_reps, lambda: pool.map(square, xs, tuned),
                           checker("Pool.map tuned", expected))
            emit("tiny", "py_pool_tuned", n, n, s, chunksize=[tuned])
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=CTX) as ex:
        for n in sizes:
            xs = tiny_inputs(n)
            expected = [x * x for x in xs]
            chunk = ceil_div(n, 4 * workers)
            s = time_calls(n_reps, lambda: list(ex.map(square, xs, chunksize=chunk)),
                           checker("ProcessPoolExecutor.map", expected))
            emit("tiny", "py_executor", n, n, s, chunksize=[chunk])
            if n <= EXECUTOR_DEFAULT_MAX_ITEMS:
                s = time_calls(n_reps, lambda: list(ex.map(square, xs)),
                               checker("ProcessPoolExecutor.map, chunksize 1", expected))
                emit("tiny", "py_executor_default", n, n, s, chunksize=[1])


def bench_chunks():
    n = 10_000 if OPTS.validate else 100_000 if OPTS.quick else 1_000_000
    # A chunk of one item costs tens of microseconds here: small chunk sizes
    # run on fewer items (reported per item).
    cap = 2_000 if OPTS.validate else 5_000 if OPTS.quick else 20_000
    n_reps = reps(5)
    with CTX.Pool(2) as pool:
        for c in [1, 10, 100, 1_000, 10_000, 100_000]:
            m = min(n, c * cap)
            xs = tiny_inputs(m)
            expected = [x * x for x in xs]
            s = time_calls(n_reps, lambda: pool.map(square, xs, c),
                           checker("Pool.map", expected))
            emit("chunks", "py_pool", c, m, s)


def calibrate_burn(ms):
    probe = 20_000
    best = 1e9
    for i in range(7):
        t = time.perf_counter()
        burn((i, probe))
        best = min(best, time.perf_counter() - t)
    return max(1, int(probe * (ms / 1e3) / best))


def bench_cpu():
    tasks = 8 if OPTS.validate else 40 if OPTS.quick else 200
    task_ms = 1 if OPTS.validate else 5
    n_reps = reps(3)
    iterations = calibrate_burn(task_ms)
    args = [(i, iterations) for i in range(tasks)]
    samples = []
    expected = None
    for _ in range(n_reps):
        t = time.perf_counter()
        expected = [burn(a) for a in args]
        samples.append(time.perf_counter() - t)
    emit("cpu", "py_serial", 1, tasks, samples, task_ms=[task_ms])
    for w in [1, 2, 4]:
        with CTX.Pool(w) as pool:
            pool.map(burn, args[:2])
            samples = []
            for _ in range(n_reps):
                t = time.perf_counter()
                out = pool.map(burn, args)
                samples.append(time.perf_counter() - t)
                if out != expected:
                    fail("Pool.map: CPU-bound results differ from the serial run")
            emit("cpu", "py_pool", w, tasks, samples)


def round_trips(who, n, trip):
    for i in range(n // 10 + 1):
        if trip(i) != i + 1:
            fail(f"{who}: wrong answer in warm-up")
    s = []
    for i in range(n):
        t = time.perf_counter()
        back = trip(i)
        s.append(time.perf_counter() - t)
        if back != i + 1:
            fail(f"{who}: sent {i}, got {back} back")
    s.sort()
    return s[len(s) // 2], s[min(len(s) - 1, len(s) * 99 // 100)]


def bench_latency():
    n = 200 if OPTS.validate else 1_000 if OPTS.quick else 5_000
    n_reps = reps(5)
    with CTX.Pool(2) as pool:
        med, p99 = [], []
        for _ in range(n_reps):
            a, b = round_trips("apply_async", n, lambda i: pool.apply_async(inc, (i,)).get())
            med.append(a)
            p99.append(b)
        emit("latency", "py_apply_async", 2, 1, med, p99=p99)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=CTX) as ex:
        med, p99 = [], []
        for _ in range(n_reps):
            a, b = round_trips("executor", n, lambda i: ex.submit(inc, i).result())
            med.append(a)
            p99.append(b)
        emit("latency", "py_executor", 2, 1, med, p99=p99)


def big_item(size, k):
    # The index in the first 8 bytes, then a byte that depends on the index.
    return k.to_bytes(8, "little") + bytes([(k * 7) & 0xFF]) * (size - 8)


def bench_big():
    size = (1 << 20) if OPTS.validate else (8 << 20)
    count = 4 if OPTS.validate else 8 if OPTS.quick else 64
    n_reps = reps(5)
    items = [big_item(size, k) for k in range(count)]
    with CTX.Pool(2) as pool:
        for impl, chunk in [("py_pool_default", None), ("py_pool_tuned", 1)]:
            first = []
            s = time_calls(n_reps, lambda: pool.map(identity, items, chunk),
                           checker("Pool.map of big items", items), first)
            parent, workers = count_faults(lambda: pool.map(identity, items, chunk))
            emit("big", impl, size, count, s, bytes=[size * count], first=first,
                 chunksize=[chunk or ceil_div(count, 8)], parent_faults=[parent],
                 worker_faults=[workers])


def bench_startup():
    ops = 2 if OPTS.validate else 5 if OPTS.quick else 15
    for w in [1, 2, 4]:
        plain, first = [], []
        for _ in range(ops):
            t = time.perf_counter()
            pool = CTX.Pool(w)
            pool.close()
            pool.join()
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            pool = CTX.Pool(w)
            if pool.apply(inc, (41,)) != 42:
                fail("start-up: wrong first result")
            pool.close()
            pool.join()
            first.append(time.perf_counter() - t)
        emit("startup", "py_pool", w, 0, plain)
        emit("startup", "py_pool_first", w, 0, first)


def numbers(n):
    """0 .. n-1, one at a time."""
    for i in range(n):
        yield i


def minor_faults(pid):
    """Minor page faults of process `pid` so far (field 10 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2:].split()[7])


def count_faults(call):
    """Page faults one call() takes in this process and in its children (their sum)."""
    def children():
        return sum(minor_faults(p.pid) for p in multiprocessing.active_children())
    parent, workers = minor_faults("self"), children()
    call()
    return minor_faults("self") - parent, children() - workers


def peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_imap():
    n = OPTS.items or (20_000 if OPTS.validate else 100_000 if OPTS.quick else 1_000_000)
    chunk = 4096  # procpool's imap grows its chunks to this size on an input of unknown length
    with CTX.Pool(2) as pool:
        pool.map(square, range(10))
        base = peak_rss_kib()
        t = time.perf_counter()
        k = 0
        for r in pool.imap(square, numbers(n), chunk):
            if r != k * k:
                fail(f"imap: item {k} gave {r}")
            k += 1
        s = time.perf_counter() - t
        if k != n:
            fail(f"imap: {k} results for {n} items")
        emit("imap", "py_pool", n, n, [s], peak_rss_kib=[peak_rss_kib()], base_rss_kib=[base],
             chunksize=[chunk])


def sleep_us(us):
    time.sleep(us / 1e6)
    return us


# The scenarios of pool_bench's heavy case: (id, workers, chunk or 0 for
# apply_async each, durations in ms, ideal ms).
HEAVY = [(1, 2, 0, [300, 300], 300),
         (2, 4, 1, [300] * 4, 300),
         (3, 4, 2, [300] * 8, 600),
         (4, 2, 1, [400, 100, 100, 100, 100], 400)]


def bench_heavy():
    scale = 0.02 if OPTS.validate else 0.25 if OPTS.quick else 1.0
    n_reps = reps(3)
    for sid, workers, chunk, durations, ideal in HEAVY:
        us = [int(m * scale * 1000) for m in durations]
        with CTX.Pool(workers) as pool:
            pool.map(sleep_us, [0] * workers)
            samples = []
            for _ in range(n_reps):
                t = time.perf_counter()
                if chunk == 0:
                    out = [r.get() for r in [pool.apply_async(sleep_us, (u,)) for u in us]]
                else:
                    out = pool.map(sleep_us, us, chunk)
                samples.append(time.perf_counter() - t)
                if out != us:
                    fail(f"heavy {sid}: wrong results")
            emit("heavy", "py_pool", sid, len(us), samples, ideal_s=[ideal * scale / 1e3])


def bench_async():
    tasks = 1_000
    # A callback's round trip passes the pool's result-handler thread: fewer of them.
    n = 50 if OPTS.validate else 200 if OPTS.quick else 2_000
    n_reps = reps(5)
    with CTX.Pool(2) as pool:
        def burst():
            # 1000 apply_async whose results are kept, then get() of each.
            rs = [pool.apply_async(inc, (i,)) for i in range(tasks)]
            return [r.get() for r in rs]

        s = time_calls(n_reps, burst, checker("apply_async burst", [i + 1 for i in range(tasks)]))
        emit("async", "py_apply_async", tasks, tasks, s)

        # apply_async(callback=), the caller asleep on an Event that the
        # callback sets: from the submit to the caller awake.
        woken = threading.Event()
        got = [None]

        def callback(v):
            got[0] = v
            woken.set()

        def trip(i):
            woken.clear()
            pool.apply_async(inc, (i,), callback=callback)  # the pool keeps the result
            woken.wait()
            return got[0]

        med, p99 = [], []
        for _ in range(n_reps):
            a, b = round_trips("apply_async callback", n, trip)
            med.append(a)
            p99.append(b)
        emit("async", "py_callback", 2, 1, med, p99=p99)


CASES = {"tiny": bench_tiny, "chunks": bench_chunks, "cpu": bench_cpu,
         "latency": bench_latency, "big": bench_big, "startup": bench_startup,
         "imap": bench_imap, "heavy": bench_heavy, "async": bench_async}


def main():
    global OPTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--items", type=int, default=0)
    ap.add_argument("cases", nargs="*", metavar="CASE", help=" ".join(CASES))
    OPTS = ap.parse_args()
    for c in OPTS.cases:
        if c not in CASES:
            ap.error(f"no case named {c!r}")
    for c in OPTS.cases or list(CASES):
        CASES[c]()
    if OPTS.validate and not OPTS.json:
        print("pool_ref: every result checked")


if __name__ == "__main__":
    main()
