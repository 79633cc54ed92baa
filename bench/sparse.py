#!/usr/bin/env python3
"""Sparse copies: `kcopyd copy` against `qemu-img convert`, alternating, on real files.

Usage: bench/sparse.py [--size-gib 8] [--data-mib 800] [--runs 5] [--dir DIR] [--kcopyd PATH]
                       [--full-mib 1024] [--json OUT]

Two cases, each copied by both commands in turn every round (so that the machine's drift hits
both alike), O_DIRECT on both sides, 16 MiB of buffers, writes out of order allowed:

  sparse  a file of --size-gib holding --data-mib of random data in 100 runs spread evenly,
          the rest holes. Goal: kcopyd's median time <= qemu-img's, the target's allocated
          size within 1 % of the source's, the content identical.
  full    a fully allocated file of --full-mib of random data: kcopyd with --sparse (the
          default) against kcopyd --sparse=off and qemu-img, to show that the zero scan costs
          nothing measurable.

Every target is removed before each run (both commands create it). Medians and ratios are
printed, and written as JSON with --json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MIB = 1 << 20


def make_sparse(path, size_bytes, data_bytes, runs=100):
    """A file of `size_bytes` holding `data_bytes` of random data in `runs` evenly spread runs."""
    run_bytes = data_bytes // runs // 4096 * 4096
    stride = size_bytes // runs // 4096 * 4096
    with open(path, "wb") as f:
        f.truncate(size_bytes)
        for i in range(runs):
            f.seek(i * stride)
            f.write(os.urandom(run_bytes))
        f.flush()
        os.fsync(f.fileno())


def make_full(path, size_bytes):
    with open(path, "wb") as f:
        for _ in range(size_bytes // MIB):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())


def allocated(path):
    return os.stat(path).st_blocks * 512


def same(a, b):
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def timed(command, target):
    """Removes `target`, syncs, drops the page cache where allowed, runs `command`: seconds."""
    if os.path.exists(target):
        os.remove(target)
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError:
        pass
    start = time.monotonic()
    process = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.monotonic() - start
    if process.returncode != 0:
        sys.exit(f"sparse: {' '.join(command)} failed: {process.stderr.decode(errors='replace').strip()}")
    return seconds


def compare(name, source, commands, target, runs, results):
    """Runs every command of `commands` (label -> argv with TARGET) once per round."""
    times = {label: [] for label in commands}
    checks = {}
    for _ in range(runs):
        for label, argv in commands.items():
            times[label].append(timed([target if a == "TARGET" else a for a in argv], target))
            checks[label] = {"identical": same(source, target), "allocated_bytes": allocated(target)}
    source_allocated = allocated(source)
    print(f"{name}: source {os.path.getsize(source) / MIB:.0f} MiB, {source_allocated / MIB:.1f} MiB allocated")
    base = statistics.median(times["qemu-img"])
    case = {"source_allocated_bytes": source_allocated, "commands": {}}
    for label, seconds in times.items():
        median = statistics.median(seconds)
        check = checks[label]
        share = check["allocated_bytes"] / source_allocated if source_allocated else 0
        print(
            f"  {label:22} median {median:6.3f} s  ({median / base:4.2f}x qemu-img)  "
            f"runs {' '.join(f'{s:.3f}' for s in seconds)}  target allocated {check['allocated_bytes'] / MIB:.1f} MiB "
            f"({share * 100:.1f} % of the source's)  identical {check['identical']}"
        )
        case["commands"][label] = {"seconds": seconds, "median_s": median, "ratio_to_qemu_img": median / base, **check}
    results[name] = case
    os.remove(target)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=int, default=8)
    parser.add_argument("--data-mib", type=int, default=800)
    parser.add_argument("--full-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp/kcopyd-bench-sparse")
    parser.add_argument("--kcopyd", default="target/release/kcopyd")
    parser.add_argument("--json")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    sparse_source = os.path.join(args.dir, "sparse-source.img")
    full_source = os.path.join(args.dir, "full-source.img")
    target = os.path.join(args.dir, "target.img")
    make_sparse(sparse_source, args.size_gib << 30, args.data_mib * MIB)
    make_full(full_source, args.full_mib * MIB)
    qemu = ["qemu-img", "convert", "-q", "-t", "none", "-T", "none", "-m", "16", "-W", "-O", "raw"]
    kcopyd = [args.kcopyd, "copy", "-q"]
    results = {}
    compare(
        "sparse",
        sparse_source,
        {"kcopyd": kcopyd + [sparse_source, "TARGET"], "qemu-img": qemu + [sparse_source, "TARGET"]},
        target,
        args.runs,
        results,
    )
    compare(
        "full",
        full_source,
        {
            "kcopyd": kcopyd + [full_source, "TARGET"],
            "kcopyd --sparse=off": kcopyd + ["--sparse=off", full_source, "TARGET"],
            "qemu-img": qemu + [full_source, "TARGET"],
        },
        target,
        args.runs,
        results,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    os.remove(sparse_source)
    os.remove(full_source)


if __name__ == "__main__":
    main()
