#!/usr/bin/env bash
# Instructions per request of the real proxy, counted by callgrind: exact and repeatable on
# this shared, noisy machine (wall-clock load figures are not). Starts the release binary on
# CONFIG under `valgrind --tool=callgrind` in front of the peer backend, sends WARMUP requests,
# zeroes the counters, sends N requests on one keep-alive connection, dumps, and prints the
# instructions per request of the whole process and of the functions named by FUNCS.
#
#   benches/callgrind.sh CONFIG PATH [N] [WARMUP]        (defaults 2000 300)
#     PATH may hold `{n}`: request i names i (warm-up requests name w1, w2, …).
#     HEADER="Authorization: Bearer …"  one header to send with every request
#     CACHE_SIM=1                       also simulate L1/LL caches (misses per request)
#     FUNCS="regex|regex"               functions to report (callgrind_annotate, inclusive)
#
# e.g. the Cedar stage of examples/identity-bench.yaml, each request another activity:
#   HEADER="Authorization: Bearer $(target/release/palisade token --key examples/fitness/dev-signing-key.pem \
#     --kid fitness-dev-1 --iss https://id.fitness.test --aud fitness-api --sub alice --group athletes \
#     --scope activities)" FUNCS='AuthorizeStage as .*Stage>::evaluate \[' CACHE_SIM=1 \
#     benches/callgrind.sh examples/identity-bench.yaml '/users/alice/activities/a{n}?limit=25'
set -euo pipefail
cfg=$(realpath "$1") path=$2 n=${3:-2000} warm=${4:-300}
out=${OUT_DIR:-$(mktemp -d /tmp/palisade-callgrind.XXXXXX)}
# shellcheck source=benches/common.sh
. "$(dirname "$0")/common.sh"
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 2; }

port=$(grep -m1 -oE '"?127\.0\.0\.1:[0-9]+' "$cfg" | cut -d: -f2)
[ -n "$port" ] || { echo "no 127.0.0.1 listener in $cfg" >&2; exit 2; }
cg=$out/callgrind.out
sim=()
[ "${CACHE_SIM:-0}" = 1 ] && sim=(--cache-sim=yes)
valgrind --tool=callgrind "${sim[@]}" --callgrind-out-file="$cg" \
  "$bin" run --config "$cfg" --threads 1 >"$out/palisade.log" 2>&1 &
vg=$!
pids+=("$vg")
hdr=(-H "${HEADER:-X-Bench: 1}")
for _ in $(seq 600); do
  curl -s -o /dev/null "${hdr[@]}" "http://127.0.0.1:$port/" && break
  kill -0 "$vg" 2>/dev/null || { cat "$out/palisade.log" >&2; exit 1; }
  sleep 0.2
done
curl -s -o /dev/null "${hdr[@]}" "http://127.0.0.1:$port${path//\{n\}/w[1-$warm]}"
callgrind_control -z "$vg" >/dev/null 2>&1
codes=$(curl -s -o /dev/null -w '%{http_code}\n' "${hdr[@]}" "http://127.0.0.1:$port${path//\{n\}/[1-$n]}" |
  sort | uniq -c | awk '{printf "%s×%s ", $1, $2}')
callgrind_control -d "$vg" >/dev/null 2>&1
dump=$cg.1
[ -s "$dump" ] || { echo "no callgrind dump at $dump" >&2; exit 1; }
echo "$n requests to $path on $(basename "$cfg"): statuses ${codes}"
callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | python3 -c '
import re, sys
n, funcs = int(sys.argv[1]), sys.argv[2]
lines = sys.stdin.read().splitlines()
events = next(l.split()[2:] for l in lines if l.startswith("Events shown:"))
def per_request(l):
    cols = re.sub(r"\(\s*[\d.]+%\)", "", l).split()[: len(events)]
    nums = [0 if x == "." else int(x.replace(",", "")) for x in cols]
    return "  ".join(f"{e}={v / n:,.0f}" for e, v in zip(events, nums))
for l in lines:
    if "PROGRAM TOTALS" in l:
        print(f"per request, whole process: {per_request(l)}")
    elif funcs and re.search(funcs, l) and re.match(r"\s*[\d,]+ \(", l):
        name = re.sub(r"\s*\[[^\]]*\]$", "", l.rsplit("%)", 1)[1]).strip()
        name = name.split(":", 1)[-1]
        print(f"per request, {name}: {per_request(l)}")
' "$n" "${FUNCS:-}"
echo "callgrind data: $dump (callgrind_annotate --inclusive=yes $dump)"
