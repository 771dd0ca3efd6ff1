"""An application that stops reading, and a client that pushes into it, for the flow-control tests.

  sink PORT     accepts on [::]:PORT (IPv4 too) and never reads: every accepted connection is
                kept open and left alone (a small receive buffer, so that the bytes in flight
                pile up in front of it, not in it). Prints {"listening": PORT}, then one
                {"accepted": n} line per connection. Runs until killed.
  push PORT K HOST [HOST ...] --release FILE [--abort N]
                opens K connections to PORT, spread round-robin over the HOSTs; each writes as
                fast as it can until no connection has moved a byte for --quiet seconds (every
                one is blocked), then prints
                {"stalled": k, "bytes": [per connection], "failed": f, "errors": [...]}.
                Then waits for FILE; once it exists, resets (RST, SO_LINGER 0) the first N
                connections (all by default), prints {"aborted": n}, and waits for FILE.2 to
                close the rest the same way ({"closed": n}) and exit.
"""
import argparse
import json
import os
import selectors
import socket
import struct
import sys
import time


def out(obj):
    print(json.dumps(obj), flush=True)


def sink(port):
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Inherited by accepted sockets: the bytes pile up in the agents, not in this process.
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    ls.bind(("::", port))
    ls.listen(1024)
    out({"listening": port})
    held = []
    while True:
        c, _ = ls.accept()
        held.append(c)
        out({"accepted": len(held)})


def abort(s):
    # Close with a reset instead of a FIN: the peer learns at once that nobody will read.
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    except OSError:
        pass


def push(a):
    chunk = b"\x5a" * 65536
    socks, errors, failed = [], [], 0
    for i in range(a.k):
        host = a.hosts[i % len(a.hosts)]
        try:
            s = socket.create_connection((host, a.port), timeout=a.timeout)
        except OSError as e:
            failed += 1
            errors.append(f"connect {host}: {type(e).__name__}: {e}")
            continue
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        s.setblocking(False)
        socks.append(s)
    sent = [0] * len(socks)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        sel.register(s, selectors.EVENT_WRITE, i)
    last_progress = time.monotonic()
    deadline = last_progress + a.max_seconds
    while time.monotonic() - last_progress < a.quiet and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            i = key.data
            try:
                n = socks[i].send(chunk)
            except BlockingIOError:
                continue
            except OSError as e:
                failed += 1
                errors.append(f"send {i}: {type(e).__name__}: {e}")
                sel.unregister(socks[i])
                continue
            if n:
                sent[i] += n
                last_progress = time.monotonic()
    out({"stalled": sum(1 for n in sent if n > 0), "bytes": sent, "failed": failed,
         "quiet": round(time.monotonic() - last_progress, 2), "errors": errors[:10]})
    while not os.path.exists(a.release):
        time.sleep(0.05)
    n = len(socks) if a.abort is None else min(a.abort, len(socks))
    for s in socks[:n]:
        abort(s)
    out({"aborted": n})
    while not os.path.exists(a.release + ".2"):
        time.sleep(0.05)
    for s in socks[n:]:
        abort(s)
    out({"closed": len(socks) - n})


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sink")
    s.add_argument("port", type=int)
    q = sub.add_parser("push")
    q.add_argument("port", type=int)
    q.add_argument("k", type=int)
    q.add_argument("hosts", nargs="+")
    q.add_argument("--release", required=True)
    q.add_argument("--abort", type=int)
    q.add_argument("--quiet", type=float, default=3.0)
    q.add_argument("--max-seconds", type=float, default=120.0)
    q.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()
    if a.cmd == "sink":
        sink(a.port)
    else:
        push(a)


if __name__ == "__main__":
    sys.exit(main())
