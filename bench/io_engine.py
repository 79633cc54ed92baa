#!/usr/bin/env python3
"""`kcopyd copy --io-engine sync` against `--io-engine uring` and qemu-img, alternating.

Usage: bench/io_engine.py [--runs N] [--dir DIR] [--kcopyd PATH]

Needs the files `bench/compare.sh` creates under DIR and a kcopyd built with
`cargo build --release -p kcopyd-cli --features io-uring`. Every round runs each command once,
in turn, for one target and for three; medians and ratios are printed.
"""

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time


def run(command):
    start = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dir", default="/var/tmp/kcopyd-bench")
    parser.add_argument("--kcopyd", default="target/release/kcopyd")
    args = parser.parse_args()
    source = os.path.join(args.dir, "source.img")
    targets = [os.path.join(args.dir, f"target{i}.img") for i in range(3)]
    size_mib = os.path.getsize(source) >> 20

    kcopyd = lambda engine, ts: [args.kcopyd, "copy", "--quiet", "--memory", "16M", "--io-engine", engine, source, *ts]
    qemu = lambda t: ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-t", "none", "-T", "none", "-m", "16", "-W", source, t]
    commands = {
        "sync 1 target": kcopyd("sync", targets[:1]),
        "uring 1 target": kcopyd("uring", targets[:1]),
        "qemu-img": qemu(targets[0]),
        "sync 3 targets": kcopyd("sync", targets),
        "uring 3 targets": kcopyd("uring", targets),
        "qemu-img x3": ["sh", "-c", " && ".join(shlex.join(qemu(t)) for t in targets)],
    }
    times = {name: [] for name in commands}
    for round_ in range(args.runs):
        for name, command in commands.items():
            times[name].append(run(command))
        print(f"round {round_ + 1}/{args.runs}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), file=sys.stderr)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'command':<16} {'median s':>9} {'MiB/s':>7}  {'min s':>6} {'max s':>6}")
    for name in commands:
        print(f"{name:<16} {median[name]:>9.3f} {size_mib / median[name]:>7.0f}  {min(times[name]):>6.3f} {max(times[name]):>6.3f}")
    for what, a, b in [
        ("uring / sync, 1 target", "uring 1 target", "sync 1 target"),
        ("uring / sync, 3 targets", "uring 3 targets", "sync 3 targets"),
        ("sync / qemu-img, 1 target", "sync 1 target", "qemu-img"),
        ("uring / qemu-img, 1 target", "uring 1 target", "qemu-img"),
        ("sync 3 / qemu-img x3", "sync 3 targets", "qemu-img x3"),
        ("uring 3 / qemu-img x3", "uring 3 targets", "qemu-img x3"),
    ]:
        print(f"{what:<28} {median[a] / median[b]:.3f}")


if __name__ == "__main__":
    main()
