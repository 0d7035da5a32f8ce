#!/usr/bin/env python3
"""False-positive scan: send benign text through a running Palisade (loopback only) and
report which rules block it.

  scripts/fp-scan.py --target http://127.0.0.1:8080 FILE... [--as json,query,form] [--max N]

Each FILE is split into paragraphs (blank-line separated, at most 1,500 characters); every
paragraph is sent as a JSON string field, a query argument and/or an urlencoded form field.
Prints the block rate per placement and the blocking rules with an example each. Standard
library only; exits 0 (it measures, it does not judge).
"""
import argparse, collections, http.client, json, sys, urllib.parse


def paragraphs(path, limit):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    for chunk in text.split("\n\n"):
        chunk = chunk.strip()
        if 3 <= len(chunk):
            yield chunk[:limit]


def send(host, port, method, target, body, ctype):
    c = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) fp-scan", "Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = ctype
    c.request(method, target, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    reason = ""
    if r.status == 403:
        try:
            reason = json.loads(data).get("error", "")
        except ValueError:
            reason = "?"
    return r.status, reason


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--target", default="http://127.0.0.1:8080")
    ap.add_argument("--as", dest="placements", default="json,query,form")
    ap.add_argument("--max", type=int, default=5000, help="most paragraphs sent")
    ap.add_argument("--limit", type=int, default=1500, help="characters per paragraph")
    a = ap.parse_args()
    u = urllib.parse.urlsplit(a.target)
    if u.hostname not in ("127.0.0.1", "::1", "localhost"):
        sys.exit("fp-scan: loopback targets only")
    host, port = u.hostname, u.port or 80
    paras = [p for f in a.files for p in paragraphs(f, a.limit)][: a.max]
    totals = collections.Counter()
    blocked = collections.Counter()
    rules = collections.Counter()
    example = {}
    for p in paras:
        for how in a.placements.split(","):
            if how == "json":
                st, why = send(host, port, "POST", "/api/notes", json.dumps({"text": p}), "application/json")
            elif how == "query":
                st, why = send(host, port, "GET", "/api/search?q=" + urllib.parse.quote(p[:1000]), None, None)
            else:
                st, why = send(host, port, "POST", "/api/notes", "text=" + urllib.parse.quote_plus(p), "application/x-www-form-urlencoded")
            totals[how] += 1
            if st == 403:
                blocked[how] += 1
                rules[why] += 1
                example.setdefault(why, p[:300])
    for how in totals:
        print(f"{how:6} {blocked[how]:5}/{totals[how]:<6} blocked ({100 * blocked[how] / max(totals[how], 1):.2f}%)")
    for why, n in rules.most_common():
        print(f"  {n:5}  {why}\n         e.g. {example[why]!r}")


if __name__ == "__main__":
    main()
