#!/usr/bin/env python3
"""NBD copies: kcopyd against nbdcopy and qemu-img convert, between qemu-nbd exports, and the
disk's own ceiling.

Usage: bench/nbd.py [--size-mib N] [--runs N] [--dir DIR] [--kcopyd PATH] [--kcopyd-args ARGS]
                    [--kcopyd-b PATH] [--kcopyd-b-args ARGS] [--skip NAME,...]
                    [--cache none|writeback] [--connections 1,2,4,8] [--servers fresh|shared]
                    [--compact-memory]

Four qemu-nbd servers (--cache=none --aio=native, unix sockets) serve a source file of random
bytes and three target files written with zeroes. Each round runs every command once, in turn, so
that the machine's drift hits them alike, each round starting one command later than the one
before (so that no command always follows the same one); medians are reported. The servers
are started again before every copy (--servers fresh), as for a one-off copy, so that no command
inherits a server's state from the one before it (qemu-nbd's allocator remembers the largest
request it freed: docs/NBD.md, "Warming the server up"); --servers shared starts them once.

  ceiling:       fio reading SRC and writing T1 at once | fio reading SRC, writing T1 T2 T3 at once
                 | fio reading the source export and writing T1's export at once, through their
                   servers (nbd engine): what the servers let any client do
  one target:    kcopyd copy SRC T1 | nbdcopy SRC T1 | qemu-img convert -m 16 -W -n SRC T1
  three targets: kcopyd copy SRC T1 T2 T3 | nbdcopy SRC T1; nbdcopy SRC T2; nbdcopy SRC T3

The ceiling is what the disk does when nothing but the data moves: fio (libaio, O_DIRECT, 1 MiB
blocks, 8 deep per file) reads the source file and writes the target file(s) directly, the
very files the copies write, all at the same time; its time is the slowest file's I/O time. No
copy through any server can be faster. (The same files, not files of fio's own: this virtual
disk reads and writes at speeds that differ by up to 25 % between two files of one directory,
and a ceiling taken on other files than the copies' is off by that for the whole run, docs/
BENCHMARKS.md, "the ceiling on the copies' own files".) Every copy's targets are checked against
the source right after it (read with O_DIRECT, outside its time), since the next command may
overwrite them. Each copy is reported as a ratio to nbdcopy and to that ceiling. `cpu` is the
command's user + system time (the servers' time is not in it).

--compact-memory (root) has the kernel compact its free memory before every command. What a
request costs this virtual disk depends on how many physically contiguous pieces its buffer
is made of, and a server's buffers get whatever pages are free when it starts: without it a
command's speed depends on how fragmented the commands before it left the free memory
(docs/BENCHMARKS.md, "the servers' buffers and the ceiling's two speeds").

--kcopyd-b adds a second kcopyd (another build or other options) to every round, for A/B runs.

--connections 1,2,4,8 runs kcopyd once per count (`kcopyd --connections N`, one and three
targets) in every round instead of once with its defaults: the sweep that chose the default.
--cache writeback serves the files through the page cache (qemu-nbd --cache=writeback
--aio=threads), as on a RAM-backed export: with --dir /dev/shm (tmpfs, which has no O_DIRECT)
the disk is out of the way and only the client, the sockets and the servers are measured; the
fio ceiling (O_DIRECT) is then left out, with the reason printed.

Needs qemu-utils (qemu-nbd, qemu-img) and libnbd-bin (nbdcopy); fio (installed with apt-get when
missing, else the ceiling is skipped with the reason); kcopyd from
`cargo build --release -p kcopyd-cli`.
"""

import argparse
import hashlib
import json
import mmap
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

FIO_BLOCK = "1M"
FIO_DEPTH = 8


def make_source(path, size_mib):
    """A file of `size_mib` MiB of random bytes at `path`."""
    subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={size_mib}", "status=none"], check=True)


def make_target(path, size_mib, direct=True):
    """A file of `size_mib` MiB at `path`, written with zeroes (O_DIRECT unless `direct` is
    false), not fallocated: the first write to an unwritten extent costs more, and only the
    first command would pay."""
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={size_mib // 4}",
                    *(["oflag=direct"] if direct else []), "status=none"], check=True)


def rotation(names, runs):
    """(round, name) for `runs` rounds of every name, each round starting one name later than
    the one before, so that no name always follows the same one."""
    for round_ in range(runs):
        for k in range(len(names)):
            yield round_, names[(round_ + k) % len(names)]


def children_cpu():
    """User + system seconds of the children waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(commands):
    """Runs `commands` (argv lists) one after the other; returns (wall seconds, CPU seconds)."""
    cpu = children_cpu()
    start = time.monotonic()
    for command in commands:
        process = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if process.returncode != 0:
            sys.exit(f"nbd bench: {shlex.join(command)} failed: {process.stderr.decode(errors='replace').strip()}")
    return time.monotonic() - start, children_cpu() - cpu


def file_digest(path):
    """SHA-256 of the file at `path`, read with O_DIRECT where the file system has it, so that
    checking a copy leaves nothing in the page cache for the commands after it."""
    digest = hashlib.sha256()
    buffer = mmap.mmap(-1, 4 << 20)  # page-aligned, as O_DIRECT needs
    view = memoryview(buffer)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        fd = os.open(path, os.O_RDONLY)  # tmpfs: no O_DIRECT
    try:
        while n := os.readv(fd, [buffer]):
            digest.update(view[:n])
    finally:
        os.close(fd)
        view.release()
        buffer.close()
    return digest.digest()


def disk_of(path):
    """The /proc/diskstats name of the whole disk holding `path`."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    base = os.path.realpath(f"/sys/dev/block/{major}:{minor}")
    if os.path.exists(os.path.join(base, "partition")):
        base = os.path.dirname(base)
    return os.path.basename(base)


def disk_busy_ms(disk):
    """Milliseconds `disk` has had I/O in flight since boot (/proc/diskstats), 0 if unknown."""
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] == disk:
                return int(fields[12])
    return 0


COMPACT_MEMORY = "/proc/sys/vm/compact_memory"


def compact_memory_available():
    """Whether this process may compact the kernel's free memory (root); prints why not."""
    if os.access(COMPACT_MEMORY, os.W_OK):
        return True
    print(f"nbd bench: --compact-memory left out: {COMPACT_MEMORY} is not writable here (needs root)",
          file=sys.stderr)
    return False


def compact_memory():
    """Has the kernel gather its free memory into contiguous blocks, so that every command
    (and the servers started for it) begins from the same state, whatever the one before left."""
    with open(COMPACT_MEMORY, "w") as f:
        f.write("1")


def fio_available():
    """Whether fio is here, installing it with apt-get when it is not; prints why not."""
    if shutil.which("fio"):
        return True
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("nbd bench: installing fio for the ceiling", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "fio"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if shutil.which("fio"):
            return True
    print("nbd bench: no ceiling rows: fio is not installed and could not be installed with apt-get",
          file=sys.stderr)
    return False


def fio_ceiling(source, targets, size_mib):
    """Seconds fio takes to read `source` and write every file of `targets` at the same time,
    O_DIRECT: the slowest job's I/O time (fio's start-up and exit are left out)."""
    command = ["fio", "--output-format=json", "--ioengine=libaio", "--direct=1", f"--bs={FIO_BLOCK}",
               f"--iodepth={FIO_DEPTH}", f"--size={size_mib}M", "--name=read", f"--filename={source}",
               "--rw=read"]
    for i, target in enumerate(targets):
        command += [f"--name=write{i}", f"--filename={target}", "--rw=write"]
    cpu = children_cpu()
    process = subprocess.run(command, capture_output=True)
    if process.returncode != 0:
        sys.exit(f"nbd bench: {shlex.join(command)} failed: {process.stderr.decode(errors='replace').strip()}")
    jobs = json.loads(process.stdout)["jobs"]
    return max(job["read"]["runtime"] + job["write"]["runtime"] for job in jobs) / 1000, children_cpu() - cpu


def fio_through_servers(source_uri, target_uri, size_mib):
    """Seconds fio takes to read the export `source_uri` and write the export `target_uri` at
    the same time through their servers (fio's nbd engine, one connection each, the
    ceiling's blocks and depth): what the servers and the disk do with no copy between the
    reads and the writes. The slowest job's I/O time, as fio_ceiling."""
    command = ["fio", "--output-format=json", "--ioengine=nbd", f"--bs={FIO_BLOCK}", f"--iodepth={FIO_DEPTH}",
               f"--size={size_mib}M", "--name=read", f"--uri={source_uri}", "--rw=read",
               "--name=write", f"--uri={target_uri}", "--rw=write"]
    cpu = children_cpu()
    process = subprocess.run(command, capture_output=True)
    if process.returncode != 0:
        sys.exit(f"nbd bench: {shlex.join(command)} failed: {process.stderr.decode(errors='replace').strip()}")
    # fio's nbd engine prints "connected to NBD server" on stdout before the JSON.
    output = process.stdout.decode()
    jobs = json.loads(output[output.index("{"):])["jobs"]
    return max(job["read"]["runtime"] + job["write"]["runtime"] for job in jobs) / 1000, children_cpu() - cpu


def serve(path, socket, read_only, cache):
    """qemu-nbd serving `path` on `socket` with `cache` (none: O_DIRECT; writeback: the page
    cache); waits until it listens."""
    aio = "native" if cache == "none" else "threads"
    command = ["qemu-nbd", "-f", "raw", f"--cache={cache}", f"--aio={aio}", "-t", "-e", "16", "-k", socket, path]
    if read_only:
        command.insert(1, "-r")
    return start_server(command, socket)


def start_server(command, socket):
    """Runs the server `command` (argv) and waits until it listens on the unix `socket`."""
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 10
    while not os.path.exists(socket):
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"nbd bench: {shlex.join(command)} did not start")
        time.sleep(0.02)
    return server


def stop_server(server):
    """Stops a server. A qemu-nbd that is still setting up when SIGTERM comes may lose it (seen:
    one stopped right after it started waited for ever): after 5 s it is killed."""
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


class Servers:
    """qemu-nbd serving `exports` (name: (path, read-only)) on unix sockets NAME.sock in `work`
    with `cache`; restart() starts them afresh (a server's allocator remembers its clients)."""

    def __init__(self, work, exports, cache):
        self.work, self.exports, self.cache, self.running = work, exports, cache, {}
        self.restart()

    def restart(self):
        self.stop()
        for name, (path, read_only) in self.exports.items():
            socket = os.path.join(self.work, name + ".sock")
            if os.path.exists(socket):
                os.unlink(socket)
            self.running[name] = serve(path, socket, read_only, self.cache)

    def stop(self):
        for server in self.running.values():
            stop_server(server)
        self.running = {}

    def pids(self):
        return {name: server.pid for name, server in self.running.items()}


def arguments(description, runs):
    """A parser with the options every NBD bench takes: --size-mib, --runs, --dir, --kcopyd."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--kcopyd", default="target/release/kcopyd")
    return parser


def main():
    parser = arguments(__doc__, runs=3)
    parser.add_argument("--kcopyd-args", default="", help="extra options for kcopyd copy")
    parser.add_argument("--kcopyd-b", help="a second kcopyd to run in every round (A/B)")
    parser.add_argument("--kcopyd-b-args", default=None, help="its options (default: --kcopyd-args)")
    parser.add_argument("--skip", default="", help="commands to leave out, comma-separated (e.g. qemu-img)")
    parser.add_argument("--cache", choices=["none", "writeback"], default="none",
                        help="qemu-nbd's cache mode (writeback for exports on tmpfs)")
    parser.add_argument("--connections", default="",
                        help="kcopyd once per connection count, comma-separated (e.g. 1,2,4,8)")
    parser.add_argument("--compact-memory", action="store_true",
                        help="compact the kernel's free memory before every command (root): each then "
                             "gets contiguous pages, whatever the one before it left")
    parser.add_argument("--servers", choices=["fresh", "shared"], default="fresh",
                        help="fresh: the servers are started again before every copy (default); "
                             "shared: started once for the whole run")
    args = parser.parse_args()
    extra = shlex.split(args.kcopyd_args)
    extra_b = extra if args.kcopyd_b_args is None else shlex.split(args.kcopyd_b_args)
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    counts = [int(count) for count in args.connections.split(",") if count.strip()]
    if args.cache != "none":
        print("nbd bench: no ceiling rows: fio's ceiling is O_DIRECT, the exports go through the page cache",
              file=sys.stderr)
        ceiling = False
    else:
        ceiling = fio_available()
    compact = args.compact_memory and compact_memory_available()

    with tempfile.TemporaryDirectory(prefix="kcopyd-nbd-bench-", dir=args.dir) as work:
        source = os.path.join(work, "source.img")
        make_source(source, args.size_mib)
        digest = file_digest(source)
        targets = [os.path.join(work, f"target{i}.img") for i in range(3)]
        for path in targets:
            make_target(path, args.size_mib, direct=args.cache == "none")
        exports = {"source": (source, True), **{f"target{i}": (t, False) for i, t in enumerate(targets)}}
        servers = Servers(work, exports, args.cache)
        uri = lambda name: f"nbd+unix:///?socket={os.path.join(work, name + '.sock')}"
        src, t = uri("source"), [uri(f"target{i}") for i in range(3)]
        # fio reads and writes the copies' own files (the disk's speed differs between files).
        ceilings = {}
        if ceiling:
            ceilings = {"fio ceiling 1": [source, targets[:1]], "fio ceiling 3": [source, targets],
                        "fio via servers 1": [src, t[0]]}
        one = {
            "kcopyd": [[args.kcopyd, "copy", *extra, src, t[0]]],
            "kcopyd B": [[args.kcopyd_b, "copy", *extra_b, src, t[0]]] if args.kcopyd_b else None,
            "nbdcopy": [["nbdcopy", src, t[0]]],
            "qemu-img": [["qemu-img", "convert", "-m", "16", "-W", "-n", "-f", "raw", "-O", "raw", src, t[0]]],
        }
        three = {
            "kcopyd 3 targets": [[args.kcopyd, "copy", *extra, src, *t]],
            "kcopyd B 3 targets": [[args.kcopyd_b, "copy", *extra_b, src, *t]] if args.kcopyd_b else None,
            "nbdcopy x3": [["nbdcopy", src, target] for target in t],
        }
        for count in counts:
            with_count = [args.kcopyd, "copy", *extra, "--connections", str(count), src]
            one[f"kcopyd c{count}"] = [[*with_count, t[0]]]
            three[f"kcopyd c{count} 3 targets"] = [[*with_count, *t]]
        if counts:
            one["kcopyd"] = three["kcopyd 3 targets"] = None
        copies = {name: commands for name, commands in [*one.items(), *three.items()]
                  if commands is not None and name not in skip}
        ceilings = {name: files for name, files in ceilings.items() if name not in skip}
        names = [*ceilings, *copies]
        times = {name: [] for name in names}
        cpus = {name: [] for name in names}
        # The disk's busy share of each command's whole run (start-up included, so a little
        # low for fio, whose own time leaves its start-up out): a copy that keeps the disk
        # busy all along is limited by the disk, whatever its ratio to a ceiling measured
        # minutes apart on a disk whose speed drifts.
        disk = disk_of(work) if args.cache == "none" else None
        busy = {name: [] for name in names}
        try:
            # Each round starts one command later: a command that follows a heavy writer
            # (fio writing 3 GiB) pays for the disk's write-back, and every command should
            # pay that alike.
            for round_, name in rotation(names, args.runs):
                through_servers = name not in ceilings or name == "fio via servers 1"
                if through_servers and args.servers == "fresh":
                    servers.restart()
                if compact:
                    compact_memory()
                busy_before, started = disk_busy_ms(disk), time.monotonic()
                if name == "fio via servers 1":
                    seconds, cpu = fio_through_servers(*ceilings[name], args.size_mib)
                elif name in ceilings:
                    seconds, cpu = fio_ceiling(*ceilings[name], args.size_mib)
                else:
                    seconds, cpu = timed(copies[name])
                busy[name].append((disk_busy_ms(disk) - busy_before) / 1000 / (time.monotonic() - started))
                times[name].append(seconds)
                cpus[name].append(cpu)
                print(f"round {round_ + 1}: {name}: {seconds:.2f} s, cpu {cpu:.2f} s", flush=True)
                # Every copy is checked before anything else writes its targets.
                if name in copies:
                    for target in targets if name in three else targets[:1]:
                        if file_digest(target) != digest:
                            sys.exit(f"nbd bench: after {name} in round {round_ + 1}, {target} "
                                     "does not hold the source")
        finally:
            servers.stop()
        median = {name: statistics.median(values) for name, values in times.items()}
        cpu = {name: statistics.median(values) for name, values in cpus.items()}
        load = os.getloadavg()
        print(f"\n{args.size_mib} MiB, qemu-nbd --cache={args.cache} on {args.dir}, medians of {args.runs} runs, {args.servers} servers"
              + (", memory compacted before every command" if compact else "")
              + f" (kcopyd {shlex.join(extra) or 'defaults'}"
              + (f"; kcopyd B {args.kcopyd_b} {shlex.join(extra_b) or 'defaults'}" if args.kcopyd_b else "")
              + f"), load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}:")
        print(f"  {'command':18} {'median':>8}  {'MiB/s':>7}  {'fastest':>8}  {'slowest':>8}  {'cpu':>7}"
              f"  {'/nbdcopy':>8}  {'/ceiling':>8}" + (f"  {'disk busy':>9}" if disk else ""))
        for name, seconds in median.items():
            three_targets = name.endswith(("3 targets", "x3", "ceiling 3"))
            nbdcopy = median.get("nbdcopy x3" if three_targets else "nbdcopy")
            floor = median.get("fio ceiling 3" if three_targets else "fio ceiling 1")
            versus_nbdcopy = f"{seconds / nbdcopy:8.2f}" if nbdcopy and not name.startswith("fio") else f"{'':8}"
            versus_ceiling = f"{seconds / floor:8.2f}" if floor else f"{'':8}"
            disk_busy = f"  {statistics.median(busy[name]) * 100:8.0f}%" if disk else ""
            print(f"  {name:18} {seconds:6.2f} s  {args.size_mib / seconds:7.0f}  {min(times[name]):6.2f} s"
                  f"  {max(times[name]):6.2f} s  {cpu[name]:5.2f} s  {versus_nbdcopy}  {versus_ceiling}{disk_busy}")
        # The goals: at the disk's ceiling where the disk decides (--cache none), ahead of
        # nbdcopy where the client does (RAM-backed exports).
        goals = [("kcopyd", "nbdcopy", "kcopyd / nbdcopy            ", 0.75, "wall"),
                 ("kcopyd 3 targets", "nbdcopy x3", "kcopyd 3 targets / 3 nbdcopy", 0.5, "wall")]
        if ceiling:
            goals = [("kcopyd", "fio ceiling 1", "kcopyd / ceiling            ", 1.05, "wall"),
                     ("kcopyd 3 targets", "fio ceiling 3", "kcopyd 3 targets / ceiling  ", 1.10, "wall"),
                     ("kcopyd", "fio via servers 1", "kcopyd / fio via servers    ", None, "wall"),
                     ("kcopyd", "nbdcopy", "kcopyd / nbdcopy            ", None, "wall")]
        elif args.cache == "writeback":
            goals.append(("kcopyd", "nbdcopy", "kcopyd cpu / nbdcopy cpu    ", 0.7, "cpu"))
        for mine, theirs, label, goal, what in goals:
            table = median if what == "wall" else cpu
            if mine in table and theirs in table and table[theirs] > 0:
                ratio = table[mine] / table[theirs]
                verdict = f"(goal {goal}: {'met' if ratio <= goal else 'not met'})" if goal else ""
                # The same ratio taken in each round, where both ran minutes apart at most:
                # the disk's speed drifts between rounds (its fastest and slowest fio runs differ
                # by up to 2x), and a ratio within a round leaves that drift out.
                per_round = times if what == "wall" else cpus
                paired = statistics.median(a / b for a, b in zip(per_round[mine], per_round[theirs]) if b > 0)
                print(f"  {label} {ratio:.2f}  {verdict}  (median of the rounds' own ratios: {paired:.2f})")
        # The best ratio the disk allows: a copy no faster than its ceiling, against nbdcopy as measured.
        if "fio ceiling 1" in median and "nbdcopy" in median:
            print(f"  best possible / nbdcopy      {median['fio ceiling 1'] / median['nbdcopy']:.2f}"
                  "  (the 1-target ceiling against nbdcopy)")
        if "fio ceiling 3" in median and "nbdcopy x3" in median:
            print(f"  best possible / 3 nbdcopy    {median['fio ceiling 3'] / median['nbdcopy x3']:.2f}"
                  "  (the 3-target ceiling against three nbdcopy runs)")


if __name__ == "__main__":
    main()
