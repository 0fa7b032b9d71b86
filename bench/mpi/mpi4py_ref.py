#!/usr/bin/env python3
"""mpi4py.futures' MPIPoolExecutor on the cases of bench/mpi/mpi_bench.cpp.

Run it the way mpi4py.futures runs a script: rank 0 runs this file, the
other ranks serve as the executor's workers.

    mpirun --oversubscribe -n N python3 -m mpi4py.futures bench/mpi/mpi4py_ref.py [--quick]

Rank 0 prints one line per case, in the format of mpi_bench, so that
scripts/bench-mpi reads both the same way. Every result is checked; a wrong
one exits with status 1. With --quick every case runs at a tiny size and only
the results are checked (nothing is printed).

The chunk sizes are the ones mpi_bench's pools choose by default: mpi::pool
cuts ceil(n / (4 * serving ranks)) items per chunk, and ends a chunk early
once its encoded items reach 16 MiB (two 8 MiB items). mpi4py.futures'
own default, one item per task, would measure something else.
"""

import statistics
import sys
import time

from mpi4py import MPI
from mpi4py.futures import MPIPoolExecutor

CHUNK_BYTES = 16 << 20  # mpi::pool_options::chunk_bytes' default


def add_one(x):
    return x + 1


def identity(v):
    return v


def twice(x):
    return x * 2


def count_primes(block):
    lo, hi = block
    composite = bytearray(hi - lo)
    p = 2
    while p * p < hi:
        first = max(p * p, (lo + p - 1) // p * p)
        if first < hi:
            composite[first - lo::p] = b"\x01" * len(range(first - lo, hi - lo, p))
        p += 1
    start = max(lo, 2)
    return (hi - start) - composite.count(1, start - lo)


def default_chunk(n, serving, item_bytes=0):
    """The chunk size mpi::pool's map uses for n items on `serving` ranks."""
    parts = 4 * serving
    k = max(1, (n + parts - 1) // parts)
    if item_bytes:
        per_chunk = max(1, -(-CHUNK_BYTES // item_bytes))  # items until a chunk reaches 16 MiB
        k = min(k, per_chunk)
    return k


def invalid(what):
    print(f"mpi4py_ref: wrong result: {what}", file=sys.stderr, flush=True)
    sys.exit(1)


def main():
    quick = "--quick" in sys.argv[1:]
    ranks = MPI.COMM_WORLD.Get_size()
    serving = max(ranks - 1, 1)

    def line(name, figure):
        if not quick:
            print(f"{ranks:>2} ranks  {name:<12} {figure}", flush=True)

    with MPIPoolExecutor() as ex:
        # The executor connects to its workers on the first task; that is its
        # start-up, not a round trip, so it happens before the clock runs.
        if ex.submit(add_one, 0).result() != 1:
            invalid("round trip (warm-up)")

        # round trip
        n = 10 if quick else 2000
        us = []
        for i in range(n):
            t = time.perf_counter()
            if ex.submit(add_one, i).result() != i + 1:
                invalid("round trip")
            us.append((time.perf_counter() - t) * 1e6)
        us.sort()
        line("round trip", f"median {us[len(us) // 2]:.1f} us, p90 {us[len(us) * 9 // 10]:.1f} us, "
                           f"p99 {us[len(us) * 99 // 100]:.1f} us")

        # bandwidth
        size = 1024 if quick else 8 << 20
        items = [b"x" * size for _ in range(2 if quick else 32)]
        k = default_chunk(len(items), serving, size)
        warm = list(ex.map(identity, [b"x" * size, b"x" * size], chunksize=k))
        if warm[0] != items[0]:
            invalid("bandwidth (warm-up)")
        t = time.perf_counter()
        out = list(ex.map(identity, items, chunksize=k))
        s = time.perf_counter() - t
        if out != items:
            invalid("bandwidth")
        gib = len(items) * size / (1 << 30)
        line("bandwidth", f"{gib / s:.3f} GiB/s each way ({len(items)} items of {size >> 20} MiB, "
                          f"chunksize {k})")
        del items, out, warm

        # tiny items
        xs = range(1000 if quick else 1_000_000)
        k = default_chunk(len(xs), serving)
        t = time.perf_counter()
        out = list(ex.map(twice, xs, chunksize=k))
        s = time.perf_counter() - t
        if len(out) != len(xs) or any(out[i] != x * 2 for i, x in enumerate(xs)):
            invalid("tiny items")
        line("tiny items", f"{s * 1e9 / len(xs):.1f} ns/item over {len(xs)} ints, chunksize {k}")

        # primes
        limit = 100_000 if quick else 10_000_000
        step = limit // 100
        blocks = [(lo, lo + step) for lo in range(0, limit, step)]
        t = time.perf_counter()
        serial = sum(count_primes(b) for b in blocks)
        serial_s = time.perf_counter() - t
        k = default_chunk(len(blocks), serving)
        t = time.perf_counter()
        counts = list(ex.map(count_primes, blocks, chunksize=k))
        s = time.perf_counter() - t
        total = sum(counts)
        if total != serial or (not quick and total != 664579) or (quick and total != 9592):
            invalid("primes")
        line("primes", f"{s:.3f} s (serial at rank 0: {serial_s:.3f} s, speed-up {serial_s / s:.2f}x)")


if __name__ == "__main__":
    main()
