#!/usr/bin/env python3
"""Wall time and peak memory of `kcopyd copy` against dd and qemu-img convert, alternating.

Usage: bench/compare.py [--size-mib N] [--runs N] [--dir DIR] [--kcopyd PATH] [--json OUT]

Every round runs each command once, in turn, so that the machine's drift hits every command
alike; medians and ratios are reported. Each command copies with O_DIRECT on both sides. The
device's own copy ceiling is measured in the same run with fio (an O_DIRECT read of the source
and an O_DIRECT write of a target at the same time).
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time


def run(command):
    """Runs `command` (argv list); returns (seconds, peak RSS in MiB)."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - start
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"compare: {shlex.join(command)} failed: {stderr.strip()}")
    return seconds, usage.ru_maxrss / 1024


def fio_ceiling(source, target, size_mib):
    """Seconds fio takes to read the source and write the target at once (1 MiB, 16 deep)."""
    command = [
        "fio", "--output-format=json", "--ioengine=libaio", "--direct=1", "--bs=1M", "--iodepth=16",
        f"--size={size_mib}M",
        "--name=read", f"--filename={source}", "--rw=read",
        "--name=write", f"--filename={target}", "--rw=write",
    ]
    start = time.monotonic()
    out = subprocess.run(command, check=True, capture_output=True).stdout
    seconds = time.monotonic() - start
    jobs = json.loads(out)["jobs"]
    runtime = max(job["read"]["runtime"] + job["write"]["runtime"] for job in jobs) / 1000
    return runtime or seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dir", default="/var/tmp/kcopyd-bench")
    parser.add_argument("--kcopyd", default="target/release/kcopyd")
    parser.add_argument("--memory", default="16M", help="kcopyd's page budget")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    os.makedirs(args.dir, exist_ok=True)
    source = os.path.join(args.dir, "source.img")
    targets = [os.path.join(args.dir, f"target{i}.img") for i in range(3)]
    size = args.size_mib << 20
    if not os.path.exists(source) or os.path.getsize(source) != size:
        print(f"writing {args.size_mib} MiB of random data to {source}", file=sys.stderr)
        with open("/dev/urandom", "rb") as random, open(source, "wb") as out:
            for _ in range(args.size_mib):
                out.write(random.read(1 << 20))
            out.flush()
            os.fsync(out.fileno())
    for target in targets:
        with open(target, "ab") as out:
            out.truncate(size)
        subprocess.run(["fallocate", "-l", str(size), target], check=True)

    kcopyd = [args.kcopyd, "copy", "--quiet", "--memory", args.memory]
    qemu = lambda t: ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-t", "none", "-T", "none", "-m", "16", "-W", source, t]
    dd = ["dd", f"if={source}", f"of={targets[0]}", "bs=1M", "iflag=direct", "oflag=direct", "status=none", "conv=notrunc"]
    three_qemu = ["sh", "-c", " && ".join(shlex.join(qemu(t)) for t in targets)]
    commands = {
        "kcopyd 1 target": kcopyd + [source, targets[0]],
        "dd": dd,
        "qemu-img": qemu(targets[0]),
        "kcopyd 3 targets": kcopyd + [source] + targets,
        "qemu-img x3": three_qemu,
    }
    times = {name: [] for name in commands}
    rss = {name: [] for name in commands}
    ceilings = []
    for round_ in range(args.runs):
        for name, command in commands.items():
            seconds, peak = run(command)
            times[name].append(seconds)
            rss[name].append(peak)
        ceilings.append(fio_ceiling(source, targets[1], args.size_mib))
        print(f"round {round_ + 1}/{args.runs}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), file=sys.stderr)

    median = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "size_mib": args.size_mib,
        "runs": args.runs,
        "median_seconds": median,
        "peak_rss_mib": {name: max(values) for name, values in rss.items()},
        "fio_ceiling_seconds": statistics.median(ceilings),
        "ratios": {
            "kcopyd / qemu-img (1 target)": median["kcopyd 1 target"] / median["qemu-img"],
            "kcopyd / dd (1 target)": median["kcopyd 1 target"] / median["dd"],
            "kcopyd 3 targets / qemu-img x3": median["kcopyd 3 targets"] / median["qemu-img x3"],
            "kcopyd / fio ceiling (1 target)": median["kcopyd 1 target"] / statistics.median(ceilings),
        },
        "commands": {name: shlex.join(command) for name, command in commands.items()},
    }
    print(f"{'command':<20} {'median s':>9} {'MiB/s':>8} {'peak RSS MiB':>13}")
    for name in commands:
        print(f"{name:<20} {median[name]:>9.3f} {args.size_mib / median[name]:>8.0f} {results['peak_rss_mib'][name]:>13.1f}")
    print(f"{'fio ceiling':<20} {results['fio_ceiling_seconds']:>9.3f}")
    for name, ratio in results["ratios"].items():
        print(f"{name:<34} {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
