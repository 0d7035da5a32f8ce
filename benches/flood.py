#!/usr/bin/env python3
"""Slow-client flood: opens N connections to a proxy on loopback that each drip a request head
one byte per second (slowloris), keeps them for a while, then closes them, and reports the
proxy's resident memory (RSS, from /proc) before, during and after, and how many connections
the proxy closed on its own (head deadline). Bounded in count and time; loopback only.

Usage: benches/flood.py --target 127.0.0.1:8080 --pid PID [--connections 2000] [--seconds 30]
"""
import argparse
import asyncio
import time


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def drip(host, port, seconds, closed_by_server, sources):
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(sources, 0))
    except OSError:
        return "refused"
    head = b"GET / HTTP/1.1\r\nHost: t\r\nUser-Agent: flood\r\nX-Slow: " + b"a" * 4096
    start = time.monotonic()
    i = 0
    try:
        while time.monotonic() - start < seconds:
            writer.write(head[i % len(head):i % len(head) + 1])
            await writer.drain()
            i += 1
            try:
                data = await asyncio.wait_for(reader.read(4096), timeout=1.0)
                if data == b"" or data.startswith(b"HTTP/1.1 408"):
                    closed_by_server.append(time.monotonic() - start)
                    return "closed"
            except asyncio.TimeoutError:
                pass
    except (ConnectionError, OSError):
        closed_by_server.append(time.monotonic() - start)
        return "closed"
    finally:
        writer.close()
    return "open"


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="127.0.0.1:8080")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=30)
    a = ap.parse_args()
    host, port = a.target.rsplit(":", 1)
    before = rss_mb(a.pid)
    closed = []
    # Spread over several loopback source addresses, as distinct clients would be.
    tasks = [
        asyncio.create_task(drip(host, int(port), a.seconds, closed, f"127.0.1.{1 + i % 200}"))
        for i in range(a.connections)
    ]
    peak = before
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1)
        peak = max(peak, rss_mb(a.pid))
    results = [t.result() for t in tasks]
    await asyncio.sleep(3)
    after = rss_mb(a.pid)
    await asyncio.sleep(10)
    later = rss_mb(a.pid)
    closed.sort()
    med = closed[len(closed) // 2] if closed else float("nan")
    print(f"connections={a.connections} closed_by_proxy={results.count('closed')} "
          f"still_open_at_end={results.count('open')} refused={results.count('refused')} "
          f"median_close_after_s={med:.1f}")
    print(f"rss_mb before={before:.1f} peak={peak:.1f} after_3s={after:.1f} after_13s={later:.1f}")


asyncio.run(main())
