#!/usr/bin/env python3
"""Where an NBD copy's time goes when the disk is fast: the disk alone, the path through the
qemu-nbd servers alone, and each half of the copy, in the same rounds as the copy itself.

Usage: bench/nbd_path.py [--size-mib N] [--runs N] [--dir DIR] [--kcopyd PATH] [--skip NAME,...]
                         [--compact-memory]

Every round runs, in turn (each round starts one row later than the one before):

  fio ceiling       fio reading SRC and writing T at once (libaio, O_DIRECT, 1 MiB, depth 8:
                    bench/nbd.py's ceiling)
  kcopyd files      kcopyd copy SRC T: the same files, no server (O_DIRECT, buffers on huge pages)
  kcopyd files 4K   kcopyd copy --no-huge-pages --subjob-size 2M --subjobs-in-flight 8 SRC T:
                    the NBD default shape on 4 KiB pages, as a server's buffers are
  kcopyd nbd        kcopyd copy between qemu-nbd exports of SRC and T (as bench/nbd.py)
  read half         kcopyd copy from the export of SRC to a null-co export (writes cost nothing)
  write half        kcopyd copy --no-sparse from a null-co export (reads cost nothing) to T's
  halves at once    both halves at the same time, 4 sub-jobs in flight each (the copy's 8 in
                    all): the same reads and writes through the same kind of servers with no
                    copy between them
  no disk           kcopyd copy between the same kind of qemu-nbd exports of loop devices over
                    files in /dev/shm: the path through the servers with the disk nearly free
                    (needs root for losetup; left out with the reason otherwise)

The servers are `qemu-nbd --cache=none --aio=native -t -e 16` on unix sockets, started afresh
before every NBD row. For every kcopyd row, beside the wall time: the mean time of a read and
of a write request as kcopyd saw it (`kcopyd copy --json`, its device statistics). Medians of
the rounds, and each row against the fio ceiling. docs/BENCHMARKS.md ("a disk faster than the
path through the servers") reads these rows.

Needs qemu-utils and fio (installed with apt-get when missing and run as root).
"""

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import importlib.util

_spec = importlib.util.spec_from_file_location("nbd_bench", os.path.join(os.path.dirname(__file__), "nbd.py"))
nbd_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbd_bench)

# Sub-jobs each half of "halves at once" keeps in flight: half of an NBD copy's default 8.
HALF_IN_FLIGHT = 4

SERVER = ["qemu-nbd", "--cache=none", "--aio=native", "-t", "-e", "16"]


def start(socket, image):
    """qemu-nbd serving `image` (argv: a raw path, or --image-opts …) on `socket`."""
    if os.path.exists(socket):
        os.unlink(socket)
    return nbd_bench.start_server(SERVER + ["-k", socket] + image, socket)


def uri(socket):
    return f"nbd+unix:///?socket={socket}"


def kcopyd_run(kcopyd, args):
    """Wall seconds of `kcopyd copy --json ARGS`, and its mean read and write request times (ms)."""
    return kcopyd_wait(kcopyd_start(kcopyd, args))


def kcopyd_start(kcopyd, args):
    """`kcopyd copy --json ARGS` started: (process, command, start time)."""
    command = [kcopyd, "copy", "--json", "--quiet", *args]
    started = time.monotonic()
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), command, started


def kcopyd_wait(running):
    """Waits for a kcopyd_start: its wall seconds and mean read and write request times (ms)."""
    process, command, started = running
    stdout, stderr = process.communicate()
    wall = time.monotonic() - started
    if process.returncode != 0:
        sys.exit(f"nbd path bench: {shlex.join(command)} failed ({process.returncode}): {stderr.strip()}")
    means = {}
    for device in json.loads(stdout)["stats"]["devices"]:
        for kind in ("read", "write"):
            counts = device[kind]
            if counts["count"]:
                means[kind] = counts["latency"]["sum_us"] / counts["count"] / 1000
    return wall, means.get("read"), means.get("write")


def loop_devices(shm, size_mib, source):
    """Two loop devices over files in `shm`: a copy of `source` and a zeroed target; None (and
    why, printed) when this cannot be done here."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        print("nbd path bench: no 'no disk' row: losetup needs root", file=sys.stderr)
        return None
    files = [os.path.join(shm, "source.img"), os.path.join(shm, "target.img")]
    shutil.copyfile(source, files[0])
    nbd_bench.make_target(files[1], size_mib, direct=False)  # tmpfs
    devices = []
    for path in files:
        made = subprocess.run(["losetup", "--find", "--show", path], capture_output=True, text=True)
        if made.returncode != 0:
            print(f"nbd path bench: no 'no disk' row: losetup: {made.stderr.strip()}", file=sys.stderr)
            detach(devices)
            return None
        devices.append(made.stdout.strip())
    return devices


def detach(devices):
    for device in devices or []:
        subprocess.run(["losetup", "--detach", device], check=False)


def rows(args, work, loops):
    """name: a function of no arguments returning (wall s, read ms, write ms)."""
    source, target = os.path.join(work, "source.img"), os.path.join(work, "target.img")
    size = args.size_mib * 1024 * 1024
    null = ["--image-opts", f"driver=null-co,size={size}"]
    null_data = ["--image-opts", f"driver=null-co,size={size},read-zeroes=off"]

    def through(images, extra=()):
        sockets = [os.path.join(work, f"s{i}.sock") for i in range(len(images))]
        servers = [start(socket, image) for socket, image in zip(sockets, images)]
        try:
            return kcopyd_run(args.kcopyd, [*extra, *map(uri, sockets)])
        finally:
            for server in servers:
                nbd_bench.stop_server(server)

    def halves_at_once():
        # Four servers: the source's and a sink's for the read half, a data source's and the
        # target's for the write half; both copies start together, the row ends with the later.
        images = [["-r", "-f", "raw", source], null, null_data, ["-f", "raw", target]]
        sockets = [os.path.join(work, f"h{i}.sock") for i in range(len(images))]
        servers = [start(socket, image) for socket, image in zip(sockets, images)]
        try:
            # Each half keeps half the copy's requests in flight: the same load on the servers.
            in_flight = ["--subjobs-in-flight", str(HALF_IN_FLIGHT)]
            halves = [[*in_flight, *extra, uri(sockets[i]), uri(sockets[i + 1])]
                      for i, extra in [(0, []), (2, ["--no-sparse"])]]
            started = time.monotonic()
            processes = [kcopyd_start(args.kcopyd, half) for half in halves]
            times = [kcopyd_wait(process) for process in processes]
            wall = time.monotonic() - started
            return wall, times[0][1], times[1][2]
        finally:
            for server in servers:
                nbd_bench.stop_server(server)

    def fio():
        seconds, _ = nbd_bench.fio_ceiling(source, [target], args.size_mib)
        return seconds, None, None

    table = {
        "fio ceiling": fio,
        "kcopyd files": lambda: kcopyd_run(args.kcopyd, [source, target]),
        "kcopyd files 4K": lambda: kcopyd_run(args.kcopyd, ["--no-huge-pages", "--subjob-size", "2M",
                                                             "--subjobs-in-flight", "8", source, target]),
        "kcopyd nbd": lambda: through([["-r", "-f", "raw", source], ["-f", "raw", target]]),
        "read half": lambda: through([["-r", "-f", "raw", source], null]),
        "write half": lambda: through([null_data, ["-f", "raw", target]], ["--no-sparse"]),
        "halves at once": halves_at_once,
    }
    if loops:
        table["no disk"] = lambda: through([["-r", "-f", "raw", loops[0]], ["-f", "raw", loops[1]]])
    return table


def report(results, args):
    print(f"\n{args.size_mib} MiB on {args.dir}, medians of {args.runs} rounds:")
    print(f"  {'row':18} {'median':>8} {'fastest':>8} {'slowest':>8} {'read ms':>8} {'write ms':>9} {'/ceiling':>9}")
    ceiling = statistics.median(r[0] for r in results["fio ceiling"]) if "fio ceiling" in results else None
    for name, runs in results.items():
        walls = [r[0] for r in runs]
        median = statistics.median(walls)

        def mean_of(index):
            values = [r[index] for r in runs if r[index] is not None]
            return f"{statistics.median(values):8.2f}" if values else f"{'':8}"

        versus = f"{median / ceiling:9.2f}" if ceiling else ""
        print(f"  {name:18} {median:7.2f}s {min(walls):7.2f}s {max(walls):7.2f}s {mean_of(1)} {mean_of(2):>9} {versus}")


def main():
    parser = nbd_bench.arguments(__doc__, runs=5)
    parser.add_argument("--skip", default="", help="rows to leave out, comma-separated")
    parser.add_argument("--compact-memory", action="store_true",
                        help="compact the kernel's free memory before every row (root; as bench/nbd.py's)")
    args = parser.parse_args()
    compact = args.compact_memory and nbd_bench.compact_memory_available()
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    if not shutil.which("qemu-nbd"):
        sys.exit("nbd path bench: needs qemu-nbd (apt-get install qemu-utils)")
    if not nbd_bench.fio_available():
        skip.add("fio ceiling")
    with tempfile.TemporaryDirectory(prefix="kcopyd-nbd-path-", dir=args.dir) as work, \
            tempfile.TemporaryDirectory(prefix="kcopyd-nbd-path-", dir="/dev/shm") as shm:
        source = os.path.join(work, "source.img")
        nbd_bench.make_source(source, args.size_mib)
        nbd_bench.make_target(os.path.join(work, "target.img"), args.size_mib)
        loops = None if "no disk" in skip else loop_devices(shm, args.size_mib, source)
        try:
            table = {name: run for name, run in rows(args, work, loops).items() if name not in skip}
            names = list(table)
            results = {name: [] for name in names}
            for round_index, name in nbd_bench.rotation(names, args.runs):
                if compact:
                    nbd_bench.compact_memory()
                results[name].append(table[name]())
                wall, read, write = results[name][-1]
                print(f"round {round_index + 1}: {name}: {wall:.2f} s"
                      + (f", read {read:.2f} ms, write {write:.2f} ms" if read and write else ""), flush=True)
            report(results, args)
        finally:
            detach(loops)


if __name__ == "__main__":
    main()
