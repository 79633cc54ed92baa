#!/usr/bin/env python3
"""NBD copies: kcopyd against nbdcopy and qemu-img convert, between qemu-nbd exports.

Usage: bench/nbd.py [--size-mib N] [--runs N] [--dir DIR] [--kcopyd PATH] [--kcopyd-args ARGS]

Four qemu-nbd servers (--cache=none --aio=native, unix sockets) serve a source file of random
bytes and three target files written with zeroes. Each round runs every command once, in turn, so
that the machine's drift hits them alike; medians are reported.

  one target:    kcopyd copy SRC T1 | nbdcopy SRC T1 | qemu-img convert -m 16 -W -n SRC T1
  three targets: kcopyd copy SRC T1 T2 T3 | nbdcopy SRC T1; nbdcopy SRC T2; nbdcopy SRC T3

Needs qemu-utils (qemu-nbd, qemu-img) and libnbd-bin (nbdcopy); kcopyd from
`cargo build --release -p kcopyd-cli`.
"""

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


def timed(commands):
    """Runs `commands` (argv lists) one after the other; returns the seconds they took."""
    start = time.monotonic()
    for command in commands:
        process = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if process.returncode != 0:
            sys.exit(f"nbd bench: {shlex.join(command)} failed: {process.stderr.decode(errors='replace').strip()}")
    return time.monotonic() - start


def serve(path, socket, read_only):
    """qemu-nbd serving `path` on `socket`; waits until it listens."""
    command = ["qemu-nbd", "-f", "raw", "--cache=none", "--aio=native", "-t", "-e", "8", "-k", socket, path]
    if read_only:
        command.insert(1, "-r")
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 10
    while not os.path.exists(socket):
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"nbd bench: {shlex.join(command)} did not start")
        time.sleep(0.02)
    return server


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--kcopyd", default="target/release/kcopyd")
    parser.add_argument("--kcopyd-args", default="", help="extra options for kcopyd copy")
    args = parser.parse_args()
    extra = shlex.split(args.kcopyd_args)

    with tempfile.TemporaryDirectory(prefix="kcopyd-nbd-bench-", dir=args.dir) as work:
        source = os.path.join(work, "source.img")
        subprocess.run(["dd", "if=/dev/urandom", f"of={source}", "bs=1M", f"count={args.size_mib}",
                        "status=none"], check=True)
        targets = []
        for i in range(3):
            target = os.path.join(work, f"target{i}.img")
            # Written, not fallocated: the first write to an unwritten extent costs more.
            subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={args.size_mib // 4}",
                            "oflag=direct", "status=none"], check=True)
            targets.append(target)
        servers = [serve(source, os.path.join(work, "source.sock"), True)]
        servers += [serve(t, os.path.join(work, f"target{i}.sock"), False) for i, t in enumerate(targets)]
        uri = lambda name: f"nbd+unix:///?socket={os.path.join(work, name + '.sock')}"
        src, t = uri("source"), [uri(f"target{i}") for i in range(3)]
        one = {
            "kcopyd": [[args.kcopyd, "copy", *extra, src, t[0]]],
            "nbdcopy": [["nbdcopy", src, t[0]]],
            "qemu-img": [["qemu-img", "convert", "-m", "16", "-W", "-n", "-f", "raw", "-O", "raw", src, t[0]]],
        }
        three = {
            "kcopyd 3 targets": [[args.kcopyd, "copy", *extra, src, *t]],
            "nbdcopy x3": [["nbdcopy", src, target] for target in t],
        }
        times = {name: [] for name in [*one, *three]}
        try:
            for round_ in range(args.runs):
                for name, commands in [*one.items(), *three.items()]:
                    seconds = timed(commands)
                    times[name].append(seconds)
                    print(f"round {round_ + 1}: {name}: {seconds:.2f} s", flush=True)
            # The copies are checked: every target holds the source.
            for target in targets:
                subprocess.run(["cmp", source, target], check=True)
        finally:
            for server in servers:
                server.terminate()
                server.wait()
        median = {name: statistics.median(values) for name, values in times.items()}
        print(f"\n{args.size_mib} MiB, medians of {args.runs} runs (kcopyd {shlex.join(extra) or 'defaults'}):")
        print(f"  {'command':18} {'median':>8}  {'MiB/s':>7}  {'fastest':>8}  {'slowest':>8}")
        for name, seconds in median.items():
            print(f"  {name:18} {seconds:6.2f} s  {args.size_mib / seconds:7.0f}  {min(times[name]):6.2f} s"
                  f"  {max(times[name]):6.2f} s")
        print(f"  kcopyd / nbdcopy            {median['kcopyd'] / median['nbdcopy']:.2f}")
        print(f"  kcopyd 3 targets / 3 nbdcopy {median['kcopyd 3 targets'] / median['nbdcopy x3']:.2f}")


if __name__ == "__main__":
    main()
