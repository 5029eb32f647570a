#!/usr/bin/env python3
"""Helpers for the `sched` section of scripts/bench.sh (stdlib only).

  bench-sched.py fifty MNT N TIMEOUT EXPECT_BYTES_PER_JOB TOTAL_SPEED
      Starts c00.raw .. c(N-1).raw in that order (one `start` write each) on a mount made
      with --max-jobs/--total-speed, follows MNT/.events, polls MNT/.control every 20 ms
      until every job ended (or TIMEOUT s), and prints one line of key=value results:
        wall (s, first start to the last `completed` event), bytes (sum of copied),
        rate (MiB/s = bytes / wall), steady (MiB/s between 10% and 90% of the bytes,
        from the .control samples), peak_running (most jobs seen running at once),
        completed (jobs in state=completed with copied == EXPECT), started_order
        (`started` events in start order: yes/no), dequeue_order (jobs seen queued left
        `queued` in start order, ties within one poll allowed: yes/no), queued (jobs ever
        seen queued), dequeue_polls (distinct polls at which they left), completion_inv
        (pairs of jobs completing out of start order, for information).
      Details (every poll's sum, the events) go to MNT.fifty.log.
  bench-sched.py extents VIRT_BYTES DATA_BYTES SEED
      Prints qemu-io `write` commands for DATA_BYTES in extents of 64 KiB..1 MiB
      (multiples of 64 KiB) scattered over VIRT_BYTES, not overlapping.
  bench-sched.py pid MNT
      The daemon's pid (xattr user.streamfs.pid on the mount root).
"""
import os
import random
import select
import sys
import threading
import time


def fifty(mnt, n, timeout, expect, total_speed):
    names = ["c%02d.raw" % i for i in range(n)]
    ctl = os.path.join(mnt, ".control")
    events = []  # (arrival time, line)
    done = threading.Event()
    evfd = os.open(os.path.join(mnt, ".events"), os.O_RDONLY | os.O_NONBLOCK)

    def reader():
        buf = b""
        while not done.is_set():
            r, _, _ = select.select([evfd], [], [], 0.1)
            if not r:
                continue
            try:
                chunk = os.read(evfd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                events.append((time.time(), line.decode(errors="replace")))

    th = threading.Thread(target=reader, daemon=True)
    th.start()

    def status():
        st = {}
        with open(ctl) as f:
            for line in f:
                p = line.split()
                if p:
                    st[p[0]] = dict(x.split("=", 1) for x in p[1:] if "=" in x)
        return st

    terminal = {"completed", "failed", "cancelled"}
    t0 = time.time()
    for nm in names:
        fd = os.open(ctl, os.O_WRONLY)
        try:
            os.write(fd, ("start %s\n" % nm).encode())
        finally:
            os.close(fd)
    samples = []
    seen_queued, left = set(), {}
    peak_running = 0
    poll = 0
    st = {}
    while True:
        st = status()
        t = time.time()
        poll += 1
        samples.append((t, sum(int(st[nm].get("copied", 0)) for nm in names)))
        peak_running = max(peak_running, sum(st[nm]["state"] == "running" for nm in names))
        for nm in names:
            s = st[nm]["state"]
            if s == "queued":
                seen_queued.add(nm)
            elif nm not in left:
                left[nm] = poll
        if all(st[nm]["state"] in terminal for nm in names) or t - t0 > timeout:
            break
        time.sleep(0.02)
    time.sleep(0.3)  # let the last events arrive
    done.set()
    th.join(2)
    os.close(evfd)

    parsed = []
    for arr, line in events:
        p = line.split()
        if len(p) >= 4:
            parsed.append((int(p[0]), arr, p[2], p[3]))
    parsed.sort()
    started = [nm for _, _, nm, ev in parsed if ev == "started" and nm in names]
    completed_ev = [(arr, nm) for _, arr, nm, ev in parsed if ev == "completed" and nm in names]
    t_end = completed_ev[-1][0] if len(completed_ev) == n else samples[-1][0]
    wall = t_end - t0
    total = samples[-1][1]
    ok = sum(st[nm]["state"] == "completed" and int(st[nm].get("copied", -1)) == expect for nm in names)

    def at(frac):
        target = frac * total
        prev = (t0, 0)
        for s in samples:
            if s[1] >= target:
                if s[1] == prev[1]:
                    return s[0]
                return prev[0] + (s[0] - prev[0]) * (target - prev[1]) / (s[1] - prev[1])
            prev = s
        return samples[-1][0]

    ta, tb = at(0.1), at(0.9)
    steady = 0.8 * total / (tb - ta) / 1048576 if tb > ta else 0
    order = [names.index(nm) for nm in names if nm in seen_queued and nm in left]
    polls = [left[names[i]] for i in order]
    deq_ok = all(a <= b for a, b in zip(polls, polls[1:])) and len(order) == len(seen_queued)
    comp_idx = [names.index(nm) for _, nm in completed_ev]
    inv = sum(1 for i in range(len(comp_idx)) for j in range(i + 1, len(comp_idx)) if comp_idx[i] > comp_idx[j])
    with open(mnt + ".fifty.log", "w") as f:
        f.write("t0 %.3f\n" % t0)
        for t, b in samples:
            f.write("sample %.3f %d\n" % (t - t0, b))
        for nm in names:
            f.write("final %s %s\n" % (nm, " ".join("%s=%s" % kv for kv in st[nm].items())))
        for arr, line in events:
            f.write("event %.3f %s\n" % (arr - t0, line))
    print(
        "wall=%.2f bytes=%d rate=%.1f steady=%.1f peak_running=%d completed=%d started_order=%s "
        "dequeue_order=%s queued=%d dequeue_polls=%d completion_inv=%d polls=%d"
        % (wall, total, total / wall / 1048576 if wall > 0 else 0, steady, peak_running, ok,
           "yes" if started == names else "no", "yes" if deq_ok else "no", len(seen_queued),
           len(set(polls)), inv, poll)
    )


def extents(virt, data, seed):
    rnd = random.Random(seed)
    unit = 64 << 10
    sizes, left = [], data
    while left > 0:
        s = min(left, rnd.randint(1, 16) * unit)
        sizes.append(s)
        left -= s
    slot = virt // len(sizes) // unit * unit
    for i, s in enumerate(sizes):
        room = (slot - s) // unit
        off = i * slot + rnd.randint(0, max(room, 0)) * unit
        print("write -q -P %d %d %d" % (i % 251 + 1, off, s))


def main(a):
    if a[:1] == ["fifty"] and len(a) == 6:
        fifty(a[1], int(a[2]), float(a[3]), int(a[4]), int(a[5]))
    elif a[:1] == ["extents"] and len(a) == 4:
        extents(int(a[1]), int(a[2]), int(a[3]))
    elif a[:1] == ["pid"] and len(a) == 2:
        print(os.getxattr(a[1], "user.streamfs.pid").decode().strip())
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
