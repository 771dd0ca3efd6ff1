"""Many concurrent echo connections held open, for the load and leak tests.

  serve PORT    epoll echo server on [::]:PORT (IPv4 too), any number of connections; prints
                {"listening": PORT}
  hold HOST PORT N [--parallel P] [--timeout T] --release FILE
                opens N connections, at most P connecting at once; each sends one byte and
                must read it back (so it is established end to end). Prints
                {"open": n, "failed": f, "seconds": s, "errors": [...]} once every attempt is
                done, then waits until FILE exists, closes every connection (FIN), prints
                {"closed": n} and exits.

Raises its own RLIMIT_NOFILE soft limit to the hard one.
"""
import argparse
import asyncio
import json
import os
import resource
import selectors
import socket
import sys
import time


def out(obj):
    print(json.dumps(obj), flush=True)


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
    out({"listening": port})
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if s is ls:
                for _ in range(256):
                    try:
                        c, _ = ls.accept()
                    except OSError:
                        break
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


async def hold(a):
    raise_nofile()
    sem = asyncio.Semaphore(a.parallel)
    held, errors = [], []
    failed = 0
    t0 = time.monotonic()

    async def one():
        nonlocal failed
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(a.host, a.port), a.timeout)
            except (OSError, asyncio.TimeoutError) as e:
                failed += 1
                if len(errors) < 20:
                    errors.append(f"connect: {type(e).__name__}: {e}")
                return
            try:
                w.write(b"h")
                got = await asyncio.wait_for(r.readexactly(1), a.timeout)
                if got != b"h":
                    raise OSError(f"echo {got!r}")
                held.append(w)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                failed += 1
                if len(errors) < 20:
                    errors.append(f"echo: {type(e).__name__}: {e}")
                w.close()

    await asyncio.gather(*(one() for _ in range(a.n)))
    out({"open": len(held), "failed": failed, "seconds": round(time.monotonic() - t0, 3),
         "errors": errors})
    while not os.path.exists(a.release):
        await asyncio.sleep(0.05)
    for w in held:
        w.close()
    for w in held:
        try:
            await w.wait_closed()
        except OSError:
            pass
    out({"closed": len(held)})


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    h = sub.add_parser("hold")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("n", type=int)
    h.add_argument("--parallel", type=int, default=200)
    h.add_argument("--timeout", type=float, default=20.0)
    h.add_argument("--release", required=True)
    a = p.parse_args()
    if a.cmd == "serve":
        serve(a.port)
    else:
        asyncio.run(hold(a))


if __name__ == "__main__":
    sys.exit(main())
