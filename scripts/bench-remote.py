#!/usr/bin/env python3
"""Remote-backing benchmark: streamfs vs qemu-storage-daemon (qsd) vs `qemu-img convert`,
side by side in one run, with the template on an NBD server (nbdkit's file plugin, with
its `delay` filter adding latency to every read, as a network would).

  sudo scripts/bench-remote.py            (root: FUSE mounts, drop_caches)

Environment: BENCH_REMOTE_MB (1024) template size; BENCH_REPEAT (3) stream runs each
(median shown); BENCH_REMOTE_LAT ("0 1 5") added
read latencies in ms; BENCH_REMOTE_SPARSE_MB (100) data in the sparse template;
BENCH_REMOTE_FANOUT (4) mounts streaming from one qemu-nbd; BENCH_DIR (/var/tmp);
BENCH_RESULTS (scripts/bench-results.txt); STREAMFS (target/release/streamfs).

Measured, per latency:
  stream   full stream of a leaf over nbd:// (streamfs `start`, qsd QMP block-stream),
           and `qemu-img convert` of the same URI to a local raw file;
  cor      cold sequential read of the whole raw file in 1 MiB O_DIRECT reads through
           copy-on-read (streamfs default; qsd's copy-on-read filter);
  first    first read of one 4 KiB block (O_DIRECT) on a fresh mount: median of 9.
Then, without added latency: the sparse template (stream time against the dense one)
and fan-out (several mounts streaming from one qemu-nbd at once).
"""
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFS = os.environ.get("STREAMFS", os.path.join(ROOT, "target/release/streamfs"))
QMP = os.path.join(ROOT, "scripts/qmp.py")
MB = 1 << 20
SIZE_MB = int(os.environ.get("BENCH_REMOTE_MB", "1024"))
LATS = [float(x) for x in os.environ.get("BENCH_REMOTE_LAT", "0 1 5").split()]
SPARSE_MB = int(os.environ.get("BENCH_REMOTE_SPARSE_MB", "100"))
FANOUT = int(os.environ.get("BENCH_REMOTE_FANOUT", "4"))
RESULTS = os.environ.get("BENCH_RESULTS", os.path.join(ROOT, "scripts/bench-results.txt"))
TIMEOUT = 900
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))

procs = []
mounts = []


def log(msg):
    print(f"[bench-remote {time.strftime('%T')}] {msg}", file=sys.stderr, flush=True)


def run(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what):
    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited: {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")


def start(cmd, port, what):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(p)
    wait_port(port, p, what)
    return p


def stop(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def nbdkit(path, lat_ms):
    port = free_port()
    cmd = ["nbdkit", "-f", "--exit-with-parent", "-r", "-i", "127.0.0.1", "-p", str(port)]
    if lat_ms:
        cmd += ["--filter=delay"]
    cmd += ["file", f"file={path}"]
    if lat_ms:
        cmd += [f"rdelay={lat_ms:g}ms"]
    return start(cmd, port, "nbdkit"), f"nbd://127.0.0.1:{port}/"


def qemu_nbd(path):
    port = free_port()
    cmd = ["qemu-nbd", "-r", "-t", "-e", "32", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), path]
    return start(cmd, port, "qemu-nbd"), f"nbd://127.0.0.1:{port}/"


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def new_leaf(path, uri):
    if os.path.exists(path):
        os.unlink(path)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", path, f"{SIZE_MB}M")


def sfs_mount(mnt, leaf, *args):
    os.makedirs(mnt, exist_ok=True)
    run(SFS, "mount", *args, mnt, f"vm.raw={leaf}")
    mounts.append(mnt)


def sfs_umount(mnt):
    run(SFS, "umount", mnt, check=False)
    if mnt in mounts:
        mounts.remove(mnt)


def control(mnt):
    with open(os.path.join(mnt, ".control")) as f:
        line = f.read().split("\n")[0]
    return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)


def sfs_stream(mnt):
    t0 = time.time()
    with open(os.path.join(mnt, ".control"), "w") as f:
        f.write("start vm.raw\n")
    while time.time() - t0 < TIMEOUT:
        st = control(mnt)
        if st.get("state") not in ("running", "queued", "paused"):
            break
        time.sleep(0.02)
    t1 = time.time()
    if st.get("state") != "completed":
        log(f"streamfs stream ended {st}")
        return None
    return t1 - t0


class Qsd:
    def __init__(self, work, leaf, cor=False):
        self.sock = os.path.join(work, "qsd.qmp")
        self.exp = os.path.join(work, "qsd.exp")
        open(self.exp, "w").close()
        node = "q"
        args = ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={leaf}",
                "--blockdev", "driver=qcow2,node-name=q,file=f",
                "--chardev", f"socket,id=qmp,path={self.sock},server=on,wait=off",
                "--monitor", "chardev=qmp"]
        if cor:
            args += ["--blockdev", "driver=copy-on-read,node-name=cor,file=q"]
            node = "cor"
        args += ["--export", f"type=fuse,id=e,node-name={node},mountpoint={self.exp},"
                 f"writable={'on' if cor else 'off'}"]
        self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(self.p)
        for _ in range(200):
            if run("findmnt", "-rn", "--mountpoint", self.exp, check=False).returncode == 0:
                return
            if self.p.poll() is not None:
                raise SystemExit(f"qsd exited: {self.p.stderr.read().decode()}")
            time.sleep(0.05)
        raise SystemExit("qsd did not come up")

    def stream(self):
        r = run(sys.executable, QMP, self.sock, "stream", "q", "--timeout", str(TIMEOUT), check=False)
        if r.returncode != 0:
            log(f"qsd stream failed: {r.stderr.strip()}")
            return None
        return float(r.stdout.strip().rsplit("elapsed=", 1)[1])

    def stop(self):
        stop(self.p)
        run("umount", "-l", self.exp, check=False)


def seq_read(path):
    """Reads the whole file in 1 MiB O_DIRECT reads; MiB/s."""
    r = run("dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct", check=False)
    secs = float(r.stderr.strip().split("\n")[-1].split(" s,")[0].split(", ")[-1])
    return SIZE_MB / secs


def first_read_ms(path, off):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        t0 = time.perf_counter()
        os.preadv(fd, [buf], off)
        return (time.perf_counter() - t0) * 1000
    finally:
        os.close(fd)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, f="%.2f"):
    return "-" if x is None else f % x


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else "%.2fx" % (a / b)


def main():
    if os.geteuid() != 0:
        raise SystemExit("bench-remote.py: run as root")
    for t in ("nbdkit", "qemu-nbd", "qemu-img", "qemu-storage-daemon"):
        if not shutil.which(t):
            raise SystemExit(f"{t} not found")
    if not os.environ.get("BENCH_NO_BUILD"):
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="streamfs-bench-remote.", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    out = []

    def say(line):
        print(line, flush=True)
        out.append(line)

    try:
        dense = os.path.join(work, "dense.raw")
        log(f"making a {SIZE_MB} MiB template")
        run("dd", "if=/dev/urandom", f"of={dense}", "bs=1M", f"count={SIZE_MB}", "status=none")
        leaf = os.path.join(work, "leaf.qcow2")
        say(f"== remote backing (nbdkit file plugin + delay filter), {SIZE_MB} MiB template, "
            f"{time.strftime('%F %T')}")
        say(f"   stream times are medians of {REPEAT} runs; every measurement starts with caches dropped")
        say("   latency | stream: streamfs  qsd  qemu-img convert (s) | cor 1M seq: streamfs  qsd (MiB/s)"
            " | first 4k: streamfs  qsd, both copy-on-read (ms)")
        for lat in LATS:
            srv, uri = nbdkit(dense, lat)
            # stream (median of REPEAT runs each, interleaved)
            mnt = os.path.join(work, "m")
            runs = {"sfs": [], "qsd": [], "cvt": []}
            for _ in range(REPEAT):
                new_leaf(leaf, uri)
                sfs_mount(mnt, leaf)
                drop_caches()
                runs["sfs"].append(sfs_stream(mnt))
                sfs_umount(mnt)
                new_leaf(leaf, uri)
                q = Qsd(work, leaf)
                drop_caches()
                runs["qsd"].append(q.stream())
                q.stop()
                dst = os.path.join(work, "convert.raw")
                drop_caches()
                t0 = time.time()
                r = run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, dst, check=False)
                runs["cvt"].append(time.time() - t0 if r.returncode == 0 else None)
                if os.path.exists(dst):
                    os.unlink(dst)
            t_sfs, t_qsd, t_cvt = med(runs["sfs"]), med(runs["qsd"]), med(runs["cvt"])
            log(f"stream at {lat:g} ms: {runs}")
            # cold copy-on-read, sequential 1 MiB
            new_leaf(leaf, uri)
            sfs_mount(mnt, leaf)
            drop_caches()
            c_sfs = seq_read(os.path.join(mnt, "vm.raw"))
            sfs_umount(mnt)
            new_leaf(leaf, uri)
            q = Qsd(work, leaf, cor=True)
            drop_caches()
            c_qsd = seq_read(q.exp)
            q.stop()
            # first 4 KiB read on a fresh mount, both with copy-on-read, and ours without
            f_sfs, f_nocor, f_qsd = [], [], []
            rng = random.Random(7)
            for _ in range(9):
                off = rng.randrange(SIZE_MB * MB // 4096) * 4096
                for into, extra in ((f_sfs, ()), (f_nocor, ("--no-copy-on-read",))):
                    new_leaf(leaf, uri)
                    sfs_mount(mnt, leaf, *extra)
                    into.append(first_read_ms(os.path.join(mnt, "vm.raw"), off))
                    sfs_umount(mnt)
                new_leaf(leaf, uri)
                q = Qsd(work, leaf, cor=True)
                f_qsd.append(first_read_ms(q.exp, off))
                q.stop()
            stop(srv)
            say(f"   {lat:g} ms | {fmt(t_sfs)}  {fmt(t_qsd)}  {fmt(t_cvt)} (qsd/ours {ratio(t_qsd, t_sfs)},"
                f" convert/ours {ratio(t_cvt, t_sfs)}) | {fmt(c_sfs, '%.0f')}  {fmt(c_qsd, '%.0f')}"
                f" ({ratio(c_sfs, c_qsd)}) | {fmt(med(f_sfs))} ({fmt(med(f_nocor))} without cor)  {fmt(med(f_qsd))}")
        # sparse template: stream time against the dense one
        sparse = os.path.join(work, "sparse.raw")
        with open(sparse, "wb") as f:
            f.truncate(SIZE_MB * MB)
        rng = random.Random(11)
        left, chunk = SPARSE_MB * MB, 1 * MB
        slots = rng.sample(range(SIZE_MB), min(SIZE_MB, SPARSE_MB))
        with open(sparse, "r+b") as f:
            for s in slots:
                f.seek(s * MB)
                f.write(os.urandom(chunk))
                left -= chunk
        times = {}
        for name, path in (("dense", dense), ("sparse", sparse)):
            srv, uri = qemu_nbd(path)
            new_leaf(leaf, uri)
            sfs_mount(mnt, leaf)
            drop_caches()
            times[name] = sfs_stream(mnt)
            sfs_umount(mnt)
            new_leaf(leaf, uri)
            q = Qsd(work, leaf)
            drop_caches()
            times["qsd-" + name] = q.stream()
            q.stop()
            stop(srv)
        say(f"   sparse ({SPARSE_MB} MiB of data in {SIZE_MB} MiB), qemu-nbd: streamfs {fmt(times['sparse'])} s"
            f" vs dense {fmt(times['dense'])} s ({ratio(times['sparse'], times['dense'])});"
            f" qsd {fmt(times['qsd-sparse'])} vs {fmt(times['qsd-dense'])} s")
        # fan-out: several mounts streaming from one qemu-nbd
        srv, uri = qemu_nbd(dense)
        ms = []
        for i in range(FANOUT):
            lf = os.path.join(work, f"fan{i}.qcow2")
            new_leaf(lf, uri)
            m = os.path.join(work, f"fm{i}")
            sfs_mount(m, lf)
            ms.append(m)
        drop_caches()
        t0 = time.time()
        for m in ms:
            with open(os.path.join(m, ".control"), "w") as f:
                f.write("start vm.raw\n")
        ends = {}
        while len(ends) < len(ms) and time.time() - t0 < TIMEOUT:
            for m in ms:
                if m not in ends and control(m).get("state") != "running":
                    ends[m] = time.time() - t0
            time.sleep(0.02)
        for m in ms:
            sfs_umount(m)
        stop(srv)
        if len(ends) == len(ms):
            wall = max(ends.values())
            each = sorted(ends.values())
            say(f"   fan-out: {FANOUT} mounts from one qemu-nbd: {FANOUT * SIZE_MB / wall:.0f} MiB/s in total;"
                f" each finished after {', '.join('%.1f' % e for e in each)} s"
                f" (slowest/fastest {each[-1] / each[0]:.2f})")
        else:
            say(f"   fan-out: not every stream ended within {TIMEOUT} s")
    finally:
        for m in list(mounts):
            sfs_umount(m)
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)
    with open(RESULTS, "a") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    main()
