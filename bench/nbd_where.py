#!/usr/bin/env python3
"""Where an NBD copy spends its time: one `kcopyd copy` between the qemu-nbd exports of
bench/nbd.py, with the CPU time of every thread of kcopyd and of every server, the machine's
idle time and the disk's busy time measured while it runs.

Usage: bench/nbd_where.py [--size-mib N] [--runs N] [--dir DIR] [--kcopyd PATH]
                          [--kcopyd-args ARGS] [--targets 1|3] [--cache none|writeback]
                          [--nbdcopy] [--kcopyd-b-args ARGS] [--servers fresh|shared]

Each run samples /proc every 20 ms: /proc/PID/task/*/stat of kcopyd (per thread, by name:
`kcopyd-nbd` is the reactor that runs every NBD connection and, when it serves every export,
the engine; `kcopyd-client` the engine otherwise),
/proc/PID/stat of each qemu-nbd, /proc/stat (all CPUs: busy and idle) and /proc/diskstats
(the disk holding --dir: its busy milliseconds, as iostat's %util). Medians over the runs:

  wall            the copy's time
  kcopyd <thread> CPU seconds of that thread, and its share of the wall time
  qemu-nbd <name> CPU seconds of that server
  faults <name>   minor page faults of that server (and of the copy), thousands: a server
                  that maps a fresh buffer for every request pays a fault per 4 KiB page
  machine busy    CPU seconds of all processes on the machine (others' builds included)
  machine idle    idle CPU seconds: 2 cores x wall - busy
  disk busy       share of the wall time the disk had I/O in flight

A thread near 100 % of the wall time is a bottleneck; idle CPU and a disk not always busy
mean the copy waits on something else (round trips, ordering).

--nbdcopy measures `nbdcopy SRC T0` (one target) in every run as well, after kcopyd, with the
same figures: what the same servers cost when another client drives them; --kcopyd-b-args
measures a second kcopyd command too (e.g. --no-warm-up). The servers are started again before
every command (--servers fresh), so that none inherits a server's allocator state from the one
before it; --servers shared starts them once.
"""

import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import importlib.util

_spec = importlib.util.spec_from_file_location("nbd_bench", os.path.join(os.path.dirname(__file__), "nbd.py"))
nbd_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbd_bench)

TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.02


def stat_cpu(path):
    """(name, CPU seconds) of a /proc/.../stat file; None if gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return name, (int(fields[11]) + int(fields[12])) / TICKS


def minor_faults(path):
    """Minor page faults of a /proc/.../stat file; 0 if gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return 0
    return int(text[text.rindex(")") + 2:].split()[7])


def machine_cpu():
    """(busy, idle) CPU seconds of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICKS, idle / TICKS


def measure(command, servers, disk):
    """Runs `command`, sampling; returns a dict of figures."""
    threads = {}
    server_start = {name: stat_cpu(f"/proc/{pid}/stat")[1] for name, pid in servers.items()}
    faults_start = {name: minor_faults(f"/proc/{pid}/stat") for name, pid in servers.items()}
    copy_faults = 0
    busy0, idle0 = machine_cpu()
    disk0 = nbd_bench.disk_busy_ms(disk) if disk else 0
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while process.poll() is None:
        for tid in os.listdir(f"/proc/{process.pid}/task") if os.path.exists(f"/proc/{process.pid}/task") else []:
            sample = stat_cpu(f"/proc/{process.pid}/task/{tid}/stat")
            if sample:
                threads[tid] = sample
        copy_faults = max(copy_faults, minor_faults(f"/proc/{process.pid}/stat"))
        time.sleep(SAMPLE_S)
    wall = time.monotonic() - start
    if process.returncode != 0:
        sys.exit(f"nbd_where: {shlex.join(command)} failed: {process.stderr.read().decode(errors='replace')}")
    busy1, idle1 = machine_cpu()
    figures = {"wall": wall}
    client = os.path.basename(command[0])
    for name, seconds in threads.values():
        figures[f"{client} {name}"] = figures.get(f"{client} {name}", 0) + seconds
    figures[f"{client} (sampled threads)"] = sum(seconds for _, seconds in threads.values())
    figures[f"faults {client} (k)"] = copy_faults / 1000
    for name, pid in servers.items():
        figures[f"qemu-nbd {name}"] = stat_cpu(f"/proc/{pid}/stat")[1] - server_start[name]
        figures[f"faults {name} (k)"] = (minor_faults(f"/proc/{pid}/stat") - faults_start[name]) / 1000
    figures["machine busy"] = busy1 - busy0
    figures["machine idle"] = idle1 - idle0
    if disk:
        figures["disk busy"] = (nbd_bench.disk_busy_ms(disk) - disk0) / 1000
    return figures


def main():
    parser = nbd_bench.arguments(__doc__, runs=5)
    parser.add_argument("--kcopyd-args", default="")
    parser.add_argument("--targets", type=int, choices=[1, 3], default=3)
    parser.add_argument("--cache", choices=["none", "writeback"], default="none")
    parser.add_argument("--nbdcopy", action="store_true", help="measure nbdcopy SRC T0 in every run too")
    parser.add_argument("--kcopyd-b-args", default=None, help="measure kcopyd with these options too")
    parser.add_argument("--servers", choices=["fresh", "shared"], default="fresh",
                        help="fresh: the servers are started again before every command (default)")
    args = parser.parse_args()
    direct = ["oflag=direct"] if args.cache == "none" else []
    with tempfile.TemporaryDirectory(prefix="kcopyd-nbd-where-", dir=args.dir) as work:
        source = os.path.join(work, "source.img")
        subprocess.run(["dd", "if=/dev/urandom", f"of={source}", "bs=1M", f"count={args.size_mib}",
                        "status=none"], check=True)
        targets = []
        for i in range(args.targets):
            path = os.path.join(work, f"target{i}.img")
            subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={args.size_mib // 4}",
                            *direct, "status=none"], check=True)
            targets.append(path)
        exports = {"source": (source, True), **{f"target{i}": (t, False) for i, t in enumerate(targets)}}
        servers = nbd_bench.Servers(work, exports, args.cache)
        uri = lambda name: f"nbd+unix:///?socket={os.path.join(work, name + '.sock')}"
        kcopyd = lambda options: [args.kcopyd, "copy", *shlex.split(options), uri("source"),
                                  *[uri(f"target{i}") for i in range(args.targets)]]
        disk = nbd_bench.disk_of(work) if args.cache == "none" else None
        commands = {"kcopyd copy": kcopyd(args.kcopyd_args)}
        if args.kcopyd_b_args is not None:
            commands["kcopyd copy B"] = kcopyd(args.kcopyd_b_args)
        if args.nbdcopy:
            commands["nbdcopy"] = ["nbdcopy", uri("source"), uri("target0")]
        runs = {label: [] for label in commands}
        try:
            for run in range(args.runs):
                for label, c in commands.items():
                    if args.servers == "fresh":
                        servers.restart()
                    figures = measure(c, servers.pids(), disk)
                    runs[label].append(figures)
                    print(f"run {run + 1}: {label} {figures['wall']:.2f} s", flush=True)
            for target in targets:
                subprocess.run(["cmp", source, target], check=True)
        finally:
            servers.stop()
    load = os.getloadavg()
    for label, figures in runs.items():
        report(label, figures, args, load)


def report(label, runs, args, load):
    """Prints the medians of one command's runs."""
    options = {"kcopyd copy": args.kcopyd_args, "kcopyd copy B": args.kcopyd_b_args}.get(label, "")
    print(f"\n{label} {options} SRC "
          f"{args.targets if 'kcopyd' in label else 1} target(s), {args.size_mib} MiB, --cache={args.cache}, "
          f"medians of {args.runs} runs, {args.servers} servers, load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}:")
    wall = statistics.median(r["wall"] for r in runs)
    names = sorted({name for r in runs for name in r if name != "wall"}, key=lambda n: (n.split()[0], n))
    print(f"  {'wall':28} {wall:6.2f} s")
    for name in names:
        value = statistics.median(r.get(name, 0) for r in runs)
        if name.startswith("faults"):
            print(f"  {name:28} {value:8.1f}")
        else:
            print(f"  {name:28} {value:6.2f} s  {100 * value / wall:5.0f} % of wall")


if __name__ == "__main__":
    main()
