#!/usr/bin/env python3
"""Tiny QMP client for scripts/bench.sh (stdlib only).

  qmp.py SOCK stream NODE [--timeout S] [--speed BYTES]
      run block-stream (job-id "s") on NODE, wait for BLOCK_JOB_COMPLETED and
      print "start=EPOCH end=EPOCH elapsed=SECONDS" (exit 1 on error/timeout)
  qmp.py SOCK cmd JSON [--timeout S]
      execute one command and print its reply
"""
import json
import socket
import sys
import time


class QMP:
    def __init__(self, path, timeout):
        self.deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > self.deadline:
                    raise SystemExit(f"qmp: cannot connect to {path}")
                time.sleep(0.05)
        self.buf = b""
        self.events = []
        self.recv()  # greeting
        self.execute("qmp_capabilities")

    def recv(self):
        while b"\n" not in self.buf:
            left = self.deadline - time.time()
            if left <= 0:
                raise SystemExit("qmp: timeout")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise SystemExit("qmp: timeout")
            if not chunk:
                raise SystemExit("qmp: connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, args=None):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self.recv()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise SystemExit(f"qmp: {cmd}: {r['error']}")
            return r.get("return")

    def event(self, names):
        while True:
            r = self.events.pop(0) if self.events else self.recv()
            if r.get("event") in names:
                return r


def main(argv):
    if len(argv) < 3:
        raise SystemExit(__doc__)
    sock, verb, rest = argv[0], argv[1], argv[2:]
    timeout, speed = 600.0, None
    pos = []
    i = 0
    while i < len(rest):
        if rest[i] == "--timeout":
            timeout = float(rest[i + 1])
            i += 2
        elif rest[i] == "--speed":
            speed = int(rest[i + 1])
            i += 2
        else:
            pos.append(rest[i])
            i += 1
    q = QMP(sock, timeout)
    if verb == "stream":
        args = {"job-id": "s", "device": pos[0]}
        if speed:
            args["speed"] = speed
        t0 = time.time()
        q.execute("block-stream", args)
        try:
            while True:
                ev = q.event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"})
                if ev["data"].get("device") == "s":
                    break
        except SystemExit as e:
            # say how far the job got before giving up
            q.deadline = time.time() + 5
            try:
                jobs = q.execute("query-block-jobs")
            except SystemExit:
                jobs = "?"
            raise SystemExit(f"{e} after {time.time() - t0:.1f}s; query-block-jobs: {jobs}")
        t1 = time.time()
        if ev["event"] == "BLOCK_JOB_ERROR" or "error" in ev["data"]:
            raise SystemExit(f"qmp: stream failed: {ev['data']}")
        print(f"start={t0:.3f} end={t1:.3f} elapsed={t1 - t0:.3f}")
    elif verb == "cmd":
        msg = json.loads(pos[0])
        print(json.dumps(q.execute(msg["execute"], msg.get("arguments"))))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
