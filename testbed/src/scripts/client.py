"""Testbed client, run inside a pod: makes TCP connections and prints what it saw as one JSON line.

  request HOST PORT [--send TEXT]   connect, send, half-close, read to EOF
  transfer HOST PORT BYTES          send BYTES random bytes while reading the echo; compare sha256
  concurrent HOST PORT COUNT        COUNT echo connections held open at the same time
  hold HOST PORT --send TEXT [--seconds N]
                                    connect, send, read the echo, report, then keep the
                                    connection open for N seconds (the test stops us sooner)

Every socket operation has a timeout; failures are reported as {"error": ..., "stage": ...}.
"""
import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time


def fmt(addr):
    host, port = addr[:2]
    if host.startswith("::ffff:"):
        host = host[len("::ffff:"):]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def emit(obj, code=0):
    print(json.dumps(obj), flush=True)
    sys.exit(code)


def connect(a):
    try:
        return socket.create_connection((a.host, a.port), timeout=a.timeout)
    except OSError as e:
        emit({"error": f"{type(e).__name__}: {e}", "stage": "connect"}, 2)


def recv_all(s, limit):
    chunks, n = [], 0
    while n < limit:
        chunk = s.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
    return b"".join(chunks)


def request(a):
    s = connect(a)
    out = {"peer": fmt(s.getpeername()), "sock": fmt(s.getsockname())}
    try:
        if a.send is not None:
            s.sendall(a.send.encode())
        s.shutdown(socket.SHUT_WR)
        out["data"] = recv_all(s, 1 << 20).decode(errors="replace")
    except OSError as e:
        out.update(error=f"{type(e).__name__}: {e}", stage="io")
        emit(out, 2)
    emit(out)


def transfer(a):
    s = connect(a)
    payload = os.urandom(a.bytes)
    errors = []

    def writer():
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(f"send: {type(e).__name__}: {e}")

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    h, n = hashlib.sha256(), 0
    try:
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    except OSError as e:
        errors.append(f"recv: {type(e).__name__}: {e}")
    t.join(a.timeout)
    out = {"sent": len(payload), "recv": n, "sent_sha256": hashlib.sha256(payload).hexdigest(),
           "recv_sha256": h.hexdigest(), "errors": errors}
    emit(out, 2 if errors else 0)


def concurrent(a):
    # The barrier waits for the slowest connect of all `count` threads: on a slow host (qemu
    # TCG) starting 100 threads alone takes seconds, so it gets 30 s, not the per-operation timeout.
    barrier = threading.Barrier(a.count, timeout=max(a.timeout, 30.0))
    results = [None] * a.count

    def one(i):
        try:
            s = socket.create_connection((a.host, a.port), timeout=a.timeout)
            barrier.wait()  # every connection is open at once before any sends
            msg = f"connection {i} of {a.count}\n".encode()
            s.sendall(msg)
            s.shutdown(socket.SHUT_WR)
            got = recv_all(s, 1 << 16)
            s.close()
            results[i] = "ok" if got == msg else f"echo mismatch: {got!r}"
        except (OSError, threading.BrokenBarrierError) as e:
            results[i] = f"{type(e).__name__}: {e}"
            barrier.abort()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(a.count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(a.timeout, 30.0) + a.timeout * 2)
    ok = sum(1 for r in results if r == "ok")
    errors = sorted({r or "no result" for r in results if r != "ok"})
    emit({"ok": ok, "failed": a.count - ok, "errors": errors[:5]}, 0 if ok == a.count else 2)


def hold(a):
    s = connect(a)
    out = {"peer": fmt(s.getpeername()), "sock": fmt(s.getsockname())}
    try:
        s.sendall(a.send.encode())
        want, got = len(a.send.encode()), b""
        while len(got) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        out["data"] = got.decode(errors="replace")
    except OSError as e:
        out.update(error=f"{type(e).__name__}: {e}", stage="io")
        emit(out, 2)
    print(json.dumps(out), flush=True)
    time.sleep(a.seconds)
    s.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--timeout", type=float, default=5.0)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("request")
    r.add_argument("--send")
    t = sub.add_parser("transfer")
    c = sub.add_parser("concurrent")
    h = sub.add_parser("hold")
    h.add_argument("--send", required=True)
    h.add_argument("--seconds", type=float, default=60.0)
    for sp in (r, t, c, h):
        sp.add_argument("host")
        sp.add_argument("port", type=int)
    t.add_argument("bytes", type=int)
    c.add_argument("count", type=int)
    a = p.parse_args()
    {"request": request, "transfer": transfer, "concurrent": concurrent, "hold": hold}[a.cmd](a)


if __name__ == "__main__":
    main()
