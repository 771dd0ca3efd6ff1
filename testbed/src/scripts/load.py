"""Steady load, long-lived connections and an echo server for the operations tests.

  serve PORT                  asyncio echo server on [::]:PORT (IPv4 too); echoes until EOF,
                              then closes
  load HOST PORT --rate R --seconds S [--timeout T]
                              R new connections per second for S seconds; each sends a unique
                              line, half-closes and must read exactly that line back, then EOF,
                              within T seconds. Prints {"progress": ...} every second and a
                              final {"summary": ...} line.
  ping HOST PORT --interval I --seconds S [--timeout T]
                              one connection, a line every I seconds, each echo checked; prints
                              one JSON line per ping and {"end": ...} with how it ended.

Every socket operation has a timeout; times are unix seconds ("wall") so a test can line them
up with what it did meanwhile.
"""
import argparse
import asyncio
import json
import resource
import socket
import sys
import time


def out(obj):
    print(json.dumps(obj), flush=True)


async def serve(a):
    async def handle(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            try:
                writer.close()
                await writer.wait_closed()
            except OSError:
                pass

    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", a.port))
    sock.listen(1024)
    server = await asyncio.start_server(handle, sock=sock, backlog=1024)
    out({"listening": a.port})
    async with server:
        await server.serve_forever()


class Stats:
    def __init__(self):
        self.started = 0
        self.ok = 0
        self.failed = 0
        self.latencies = []
        self.failures = []


async def one(a, i, st):
    msg = f"request {i} {time.time():.6f}\n".encode()
    start = time.monotonic()
    stage = "connect"

    async def run():
        nonlocal stage
        reader, writer = await asyncio.open_connection(a.host, a.port)
        stage = "io"
        try:
            writer.write(msg)
            await writer.drain()
            writer.write_eof()
            got = b""
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                got += chunk
            return got
        finally:
            writer.close()

    try:
        got = await asyncio.wait_for(run(), a.timeout)
        error = None if got == msg else f"echo mismatch: {len(got)} of {len(msg)} bytes"
        if error:
            stage = "echo"
    except asyncio.TimeoutError:
        error = f"timeout after {a.timeout}s"
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    latency = time.monotonic() - start
    st.latencies.append(latency)
    if error is None:
        st.ok += 1
    else:
        st.failed += 1
        st.failures.append({"i": i, "wall": round(time.time(), 3), "stage": stage,
                            "error": error, "latency": round(latency, 3)})


async def load(a):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    st = Stats()
    total = int(a.rate * a.seconds)
    t0 = time.monotonic()
    wall0 = time.time()

    async def reporter():
        while True:
            await asyncio.sleep(1.0)
            out({"progress": {"t": round(time.monotonic() - t0, 2), "wall": round(time.time(), 3),
                              "started": st.started, "ok": st.ok, "failed": st.failed}})

    rep = asyncio.create_task(reporter())
    tasks = []
    for i in range(total):
        delay = t0 + i / a.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        st.started += 1
        tasks.append(asyncio.create_task(one(a, i, st)))
    issued = time.monotonic() - t0
    await asyncio.gather(*tasks)
    rep.cancel()
    lat = sorted(st.latencies)

    def pct(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 4) if lat else None

    out({"summary": {
        "requests": total, "ok": st.ok, "failed": st.failed,
        "issue_seconds": round(issued, 3), "rate": round(total / issued, 1) if issued else None,
        "wall_start": round(wall0, 3), "wall_end": round(time.time(), 3),
        "latency_p50": pct(0.5), "latency_p99": pct(0.99), "latency_max": pct(1.0),
        "slow_over_1s": sum(1 for x in lat if x > 1.0),
        "failures": st.failures[:50],
    }})


def ping(a):
    try:
        s = socket.create_connection((a.host, a.port), timeout=a.timeout)
    except OSError as e:
        out({"end": "connect", "error": f"{type(e).__name__}: {e}", "wall": time.time()})
        return
    out({"connected": True, "sock": "%s:%d" % s.getsockname()[:2], "wall": time.time()})
    t0 = time.monotonic()
    i = 0
    end = {"end": "done"}
    while time.monotonic() - t0 < a.seconds:
        msg = f"ping {i}\n".encode()
        try:
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(len(msg) - len(got))
                if not chunk:
                    break
                got += chunk
        except socket.timeout:
            end = {"end": "timeout", "error": f"no echo in {a.timeout}s"}
            break
        except OSError as e:
            end = {"end": "reset" if isinstance(e, ConnectionResetError) else "error",
                   "error": f"{type(e).__name__}: {e}"}
            break
        if not got:
            end = {"end": "eof"}
            break
        if got != msg:
            end = {"end": "mismatch", "error": f"got {got!r}"}
            break
        out({"ping": i, "wall": time.time()})
        i += 1
        time.sleep(a.interval)
    end.update(pings=i, wall=time.time())
    out(end)
    s.close()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    l = sub.add_parser("load")
    l.add_argument("--rate", type=float, required=True)
    l.add_argument("--seconds", type=float, required=True)
    g = sub.add_parser("ping")
    g.add_argument("--interval", type=float, default=0.2)
    g.add_argument("--seconds", type=float, default=60.0)
    for sp in (l, g):
        sp.add_argument("host")
        sp.add_argument("port", type=int)
        sp.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args()
    if a.cmd == "serve":
        asyncio.run(serve(a))
    elif a.cmd == "load":
        asyncio.run(load(a))
    else:
        ping(a)


if __name__ == "__main__":
    sys.exit(main())
