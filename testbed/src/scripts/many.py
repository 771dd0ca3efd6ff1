"""Many concurrent echo connections held open, for the load and leak tests and the bench.

  serve PORT    epoll echo server on [::]:PORT (IPv4 too), any number of connections; prints
                {"listening": PORT}
  hold HOST PORT N [--parallel P] [--timeout T] --release FILE
                opens N connections, at most P connecting at once; each sends one byte and
                must read it back (so it is established end to end). Prints
                {"open": n, "failed": f, "seconds": s, "errors": [...]} once every attempt is
                done, then waits until FILE exists, closes every connection (FIN), prints
                {"closed": n} and exits.
  steps HOST PORT N1 [N2 ...] [--parallel P] [--timeout T] [--max-seconds S]
                opens connections as `hold` does until N1 are established (stops early after
                100 failures), prints {"open": n, "failed": f, "errors": [...]}, then waits for
                a line on stdin before going on to N2, ...; stdin EOF (or S seconds in all)
                closes everything and exits. (`cargo xtask bench`: memory per connection.)

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
import threading
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


class Opener:
    """Opens connections to HOST:PORT, at most `parallel` connecting at once; each sends one
    byte and must read it back. Keeps the good ones in `held`, counts the rest."""

    def __init__(self, a):
        self.host, self.port, self.timeout = a.host, a.port, a.timeout
        self.sem = asyncio.Semaphore(a.parallel)
        self.held, self.errors, self.failed = [], [], 0

    async def open(self, n):
        await asyncio.gather(*(self.one() for _ in range(n)))

    async def one(self):
        async with self.sem:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout)
            except (OSError, asyncio.TimeoutError) as e:
                self.fail("connect", e)
                return
            try:
                w.write(b"h")
                got = await asyncio.wait_for(r.readexactly(1), self.timeout)
                if got != b"h":
                    raise OSError(f"echo {got!r}")
                self.held.append(w)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                self.fail("echo", e)
                w.close()

    def fail(self, stage, e):
        self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(f"{stage}: {type(e).__name__}: {e}")

    async def close_all(self):
        for w in self.held:
            w.close()
        for w in self.held:
            try:
                await w.wait_closed()
            except OSError:
                pass


async def hold(a):
    raise_nofile()
    opener = Opener(a)
    t0 = time.monotonic()
    await opener.open(a.n)
    out({"open": len(opener.held), "failed": opener.failed,
         "seconds": round(time.monotonic() - t0, 3), "errors": opener.errors})
    while not os.path.exists(a.release):
        await asyncio.sleep(0.05)
    await opener.close_all()
    out({"closed": len(opener.held)})


def stdin_lines():
    """A queue of stdin's lines, "" at EOF, fed by a daemon thread (stdin may be any file)."""
    loop = asyncio.get_running_loop()
    lines = asyncio.Queue()

    def pump():
        try:
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, "")
        except RuntimeError:
            pass  # the loop closed: the script is exiting

    threading.Thread(target=pump, daemon=True).start()
    return lines


async def steps(a):
    raise_nofile()
    opener = Opener(a)
    end = time.monotonic() + a.max_seconds
    lines = stdin_lines()
    for n in a.counts:
        while len(opener.held) < n and opener.failed < 100 and time.monotonic() < end:
            await opener.open(n - len(opener.held))
        out({"open": len(opener.held), "failed": opener.failed, "errors": opener.errors})
        try:
            if not await asyncio.wait_for(lines.get(), max(0.0, end - time.monotonic())):
                break
        except asyncio.TimeoutError:
            break
    await opener.close_all()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    h = sub.add_parser("hold")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("n", type=int)
    h.add_argument("--release", required=True)
    t = sub.add_parser("steps")
    t.add_argument("host")
    t.add_argument("port", type=int)
    t.add_argument("counts", type=int, nargs="+")
    t.add_argument("--max-seconds", type=float, default=600.0)
    for q in (h, t):
        q.add_argument("--parallel", type=int, default=200)
        q.add_argument("--timeout", type=float, default=20.0)
    a = p.parse_args()
    if a.cmd == "serve":
        serve(a.port)
    elif a.cmd == "hold":
        asyncio.run(hold(a))
    else:
        asyncio.run(steps(a))


if __name__ == "__main__":
    sys.exit(main())
