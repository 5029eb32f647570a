#!/usr/bin/env python3
"""Event delivery: delay from a job's end to the event reaching blocked readers, and the
daemon's CPU time while readers sit idle (there is no polling loop to cost any).

    scripts/bench-events.py [--jobs N] [--readers R] [--idle SECS]

Mounts N small chains, keeps R readers blocked in read() on .events, runs N short
streams one after another, and reports for each `completed` event the time from the
event's own timestamp (taken when the job settled) to its arrival in each reader
(median, p99, max). Then it measures the daemon's user+system CPU over SECS with
the readers blocked and nothing happening.
"""
import argparse, os, statistics, subprocess, sys, tempfile, threading, time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFS = os.environ.get("STREAMFS", os.path.join(ROOT, "target/release/streamfs"))


def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)


def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime + stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--idle", type=float, default=10.0)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="bench-events-", dir="/var/tmp")
    images = []
    for i in range(args.jobs):
        b, t = f"{d}/b{i}.qcow2", f"{d}/d{i}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", b, "4M")
        run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x11 0 4M", b)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t)
        images.append(t)
    mnt = f"{d}/mnt"
    os.mkdir(mnt)
    run(SFS, "mount", mnt, *images)
    pid = int(os.getxattr(mnt, "user.streamfs.pid"))
    delays = []
    lock = threading.Lock()

    def reader():
        with open(f"{mnt}/.events", "rb", buffering=0) as f:
            while True:
                chunk = f.read(65536)
                now = time.time()
                if not chunk:
                    return
                for line in chunk.decode().splitlines():
                    parts = line.split(" ")
                    if parts[3] == "completed":
                        t = datetime.strptime(parts[1], "%Y-%m-%dT%H:%M:%S.%fZ")
                        t = t.replace(tzinfo=timezone.utc).timestamp()
                        with lock:
                            delays.append((now - t) * 1000)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(args.readers)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    for i in range(args.jobs):
        with open(f"{mnt}/.control", "w") as c:
            c.write(f"start d{i}.raw")
        while f"d{i}.raw state=completed" not in open(f"{mnt}/.control").read():
            time.sleep(0.01)
    time.sleep(0.5)
    t0 = cpu_ticks(pid)
    time.sleep(args.idle)
    idle_ticks = cpu_ticks(pid) - t0
    subprocess.run([SFS, "umount", mnt], check=True)
    for t in threads:
        t.join(5)
    delays.sort()
    n = len(delays)
    print(f"events: {args.jobs} completed events x {args.readers} blocked readers = {n} deliveries")
    if n:
        print(f"delay job end -> reader: median {statistics.median(delays):.3f} ms, "
              f"p99 {delays[min(n - 1, int(n * 0.99))]:.3f} ms, max {delays[-1]:.3f} ms")
    hz = os.sysconf("SC_CLK_TCK")
    print(f"daemon CPU over {args.idle:.0f} s idle with {args.readers} blocked readers: "
          f"{idle_ticks} ticks ({idle_ticks / hz * 1000:.0f} ms)")
    subprocess.run(["rm", "-rf", d])
    return 0 if n == args.jobs * args.readers else 1


if __name__ == "__main__":
    sys.exit(main())
