"""Bench holder: many idle TCP connections, for the agents' memory per connection.

  serve PORT                    accept everything, echo what arrives, keep connections open
  hold HOST PORT N1 [N2 ...] [--max-seconds S]
                                open connections until N1 are established end to end (one
                                byte sent and echoed on each), print {"open": N1, "failed": F},
                                then wait for a line on stdin before going on to N2, ...;
                                stdin EOF (or S seconds) closes everything and exits
"""
import json
import resource
import select
import selectors
import socket
import sys
import time


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(port):
    raise_nofile()
    sel = selectors.DefaultSelector()
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("::", port))
    ls.listen(4096)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if s is ls:
                try:
                    c, _ = ls.accept()
                except OSError:
                    continue
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                continue
            try:
                s.send(data)
            except OSError:
                pass


def open_one(host, port):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"h")
    if s.recv(1) != b"h":
        raise OSError("no echo")
    return s


def hold(host, port, steps, max_seconds):
    raise_nofile()
    end = time.monotonic() + max_seconds
    held, failed = [], 0
    for n in steps:
        while len(held) < n and time.monotonic() < end and failed < 100:
            try:
                held.append(open_one(host, port))
            except OSError as e:
                failed += 1
                print(f"connect failed: {e}", file=sys.stderr, flush=True)
        print(json.dumps({"open": len(held), "failed": failed}), flush=True)
        ready, _, _ = select.select([sys.stdin], [], [], max(0.0, end - time.monotonic()))
        if not ready or not sys.stdin.readline():
            break
    for s in held:
        s.close()


def main():
    args = sys.argv[1:]
    if args[:1] == ["serve"]:
        serve(int(args[1]))
    elif args[:1] == ["hold"]:
        max_seconds = 600.0
        if "--max-seconds" in args:
            i = args.index("--max-seconds")
            max_seconds = float(args[i + 1])
            del args[i : i + 2]
        hold(args[1], int(args[2]), [int(n) for n in args[3:]], max_seconds)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
