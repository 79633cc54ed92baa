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
import tempfile
import time


def run(command):
    """Runs `command` (argv list); returns (seconds, peak RSS in MiB).

    The peak RSS comes from GNU time, not from this script's own wait4: Linux carries a
    process's high-water mark across exec, so a child forked from Python would report at
    least Python's own size."""
    with tempfile.NamedTemporaryFile("r") as rss_file:
        start = time.monotonic()
        process = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file.name] + command,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.monotonic() - start
        if process.returncode != 0:
            sys.exit(f"compare: {shlex.join(command)} failed: {process.stderr.decode(errors='replace').strip()}")
        return seconds, int(rss_file.read().split()[-1]) / 1024


def fio_ceiling(source, target, size_mib, huge=False):
    """Seconds fio takes to read the source and write the target at once (1 MiB, 16 deep),
    with its buffers on 4 KiB pages or, with `huge`, on reserved 2 MiB huge pages."""
    command = [
        "fio", "--output-format=json", "--ioengine=libaio", "--direct=1", "--bs=1M", "--iodepth=16",
        f"--size={size_mib}M", *(["--iomem=shmhuge", "--hugepage-size=2M"] if huge else []),
        "--name=read", f"--filename={source}", "--rw=read",
        "--name=write", f"--filename={target}", "--rw=write",
    ]
    start = time.monotonic()
    out = subprocess.run(command, check=True, capture_output=True).stdout
    seconds = time.monotonic() - start
    jobs = json.loads(out)["jobs"]
    runtime = max(job["read"]["runtime"] + job["write"]["runtime"] for job in jobs) / 1000
    return runtime or seconds


HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def reserve_huge_pages(count):
    """Reserves `count` 2 MiB huge pages for fio's buffers; returns the old reservation to
    restore, or None (with the reason printed) where that cannot be done."""
    try:
        with open(HUGEPAGES) as f:
            old = int(f.read())
        with open(HUGEPAGES, "w") as f:
            f.write(str(max(old, count)))
        with open(HUGEPAGES) as f:
            if int(f.read()) < count:
                raise OSError("the kernel reserved fewer than asked")
        return old
    except OSError as error:
        print(f"compare: no fio ceiling with huge-page buffers: cannot reserve huge pages ({error})", file=sys.stderr)
        return None


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
        "kcopyd 1 target, 4K pages": kcopyd + ["--no-huge-pages", source, targets[0]],
        "kcopyd 2M x 8 (whole budget)": kcopyd + ["--subjob-size", "2M", "--subjobs-in-flight", "8", source, targets[0]],
        "dd": dd,
        "qemu-img": qemu(targets[0]),
        "kcopyd 3 targets": kcopyd + [source] + targets,
        "qemu-img x3": three_qemu,
    }
    times = {name: [] for name in commands}
    rss = {name: [] for name in commands}
    ceilings = []
    huge_ceilings = []
    # fio's two jobs hold 16 buffers of 1 MiB each; a margin for its other allocations.
    old_huge_pages = reserve_huge_pages(48)
    for round_ in range(args.runs):
        for name, command in commands.items():
            seconds, peak = run(command)
            times[name].append(seconds)
            rss[name].append(peak)
        ceilings.append(fio_ceiling(source, targets[1], args.size_mib))
        if old_huge_pages is not None:
            huge_ceilings.append(fio_ceiling(source, targets[1], args.size_mib, huge=True))
        print(f"round {round_ + 1}/{args.runs}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), file=sys.stderr)

    if old_huge_pages is not None:
        with open(HUGEPAGES, "w") as f:
            f.write(str(old_huge_pages))
    median = {name: statistics.median(values) for name, values in times.items()}
    huge_ceiling = statistics.median(huge_ceilings) if huge_ceilings else None
    results = {
        "size_mib": args.size_mib,
        "runs": args.runs,
        "median_seconds": median,
        "peak_rss_mib": {name: max(values) for name, values in rss.items()},
        "fio_ceiling_seconds": statistics.median(ceilings),
        "fio_ceiling_huge_pages_seconds": huge_ceiling,
        "ratios": {
            "kcopyd / qemu-img (1 target)": median["kcopyd 1 target"] / median["qemu-img"],
            "kcopyd / dd (1 target)": median["kcopyd 1 target"] / median["dd"],
            "kcopyd 3 targets / qemu-img x3": median["kcopyd 3 targets"] / median["qemu-img x3"],
            "kcopyd / fio ceiling (1 target)": median["kcopyd 1 target"] / statistics.median(ceilings),
            "kcopyd huge pages / 4K pages (1 target)": median["kcopyd 1 target"] / median["kcopyd 1 target, 4K pages"],
        },
        "commands": {name: shlex.join(command) for name, command in commands.items()},
    }
    print(f"{'command':<26} {'median s':>9} {'MiB/s':>8} {'peak RSS MiB':>13}")
    for name in commands:
        print(f"{name:<26} {median[name]:>9.3f} {args.size_mib / median[name]:>8.0f} {results['peak_rss_mib'][name]:>13.1f}")
    print(f"{'fio ceiling':<26} {results['fio_ceiling_seconds']:>9.3f}")
    if huge_ceiling is not None:
        print(f"{'fio ceiling, huge pages':<26} {huge_ceiling:>9.3f}")
        results["ratios"]["kcopyd / fio ceiling with huge pages (1 target)"] = median["kcopyd 1 target"] / huge_ceiling
    for name, ratio in results["ratios"].items():
        print(f"{name:<48} {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
