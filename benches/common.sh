# Shared by benches/load.sh and benches/tls-load.sh (sourced, not run): settings, the peer
# (nginx + backend from ../shared/peer), the Palisade processes of a run and their cleanup,
# one wrk run turned into a result line, and the report of medians.
#
# The caller sets `out` (its output folder) before sourcing; it may define `extra_cleanup`.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
peer=${PEER_SCRIPTS:-$root/../shared/peer}
proxy_cpu=${PROXY_CPU:-1}
bin=${PALISADE_BIN:-$root/target/release/palisade}
mkdir -p "$out"

[ -x "$bin" ] || (cd "$root" && cargo build --release --bin palisade)
[ -x "$peer/start.sh" ] || { echo "peer scripts not found at $peer (set PEER_SCRIPTS)" >&2; exit 2; }
# Peers already running (someone else's) are used and left running; peers this run starts
# are stopped at exit (stop.sh stops by pid file only).
peer_dir=${PEER_DIR:-/tmp/palisade-peer}
started_peers=1
if [ -s "$peer_dir/proxy.pid" ] && kill -0 "$(cat "$peer_dir/proxy.pid")" 2>/dev/null; then
  started_peers=0
fi
"$peer/start.sh" >/dev/null

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if declare -F extra_cleanup >/dev/null; then extra_cleanup; fi
  if [ "$started_peers" = 1 ]; then "$peer/stop.sh" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# One Palisade worker pinned to the proxy CPU; stopped at exit.
start_palisade() { # name config
  taskset -c "$proxy_cpu" "$bin" run --config "$2" --threads 1 >"$out/$1.log" 2>&1 &
  pids+=($!)
}

# Wait until each URL answers with any HTTP status (a 401 is an answer; at most 10 s each).
wait_ready() { # url...
  local u
  for u in "$@"; do
    for _ in $(seq 100); do curl -sk -o /dev/null "$u" && break; sleep 0.1; done
  done
}

# One wrk run pinned to the bench CPU, printed as the peer's bench.sh prints it:
#   url=… workload=… rps=… p50_ms=… p99_ms=… non2xx=… errors=…
wrk_run() { # url workload secs conns script [env NAME=VALUE…]
  local url=$1 workload=$2 secs=$3 conns=$4 script=$5 o
  shift 5
  o=$(env "$@" taskset -c "${BENCH_CPU:-0}" wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$script" "$url")
  python3 - "$url" "$workload" "$o" <<'PY'
import re, sys
url, w, o = sys.argv[1], sys.argv[2], sys.argv[3]
def ms(v):
    n = float(re.sub(r"[a-z]+$", "", v))
    return n / 1000 if v.endswith("us") else n * 1000 if v.endswith("s") and not v.endswith("ms") else n
rps = re.search(r"Requests/sec:\s+([\d.]+)", o).group(1)
lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", o, re.M))
non = re.search(r"Non-2xx or 3xx responses: (\d+)", o)
err = re.search(r"Socket errors: (.*)", o)
print(f"url={url} workload={w} rps={rps} p50_ms={ms(lat['50'])} p99_ms={ms(lat['99'])} non2xx={non.group(1) if non else 0} errors={(err.group(1).replace(' ', '') if err else 'none')}")
PY
}

# Medians over rounds per workload and target, with each target's ratio to its baseline in
# the same run: `nginx`, or `nginx-tls` for targets named `*-tls`.
report() { # results-file
  python3 - "$1" <<'PY'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in l.split()) for l in open(sys.argv[1]) if l.strip()]
print("\nmedians over rounds (ratio = rps / nginx rps over the same transport, same workload, same run)")
print(f"{'workload':10} {'target':22} {'rps':>10} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6} {'non2xx':>7}")
for w in dict.fromkeys(r["workload"] for r in rows):
    med = {}
    for t in dict.fromkeys(r["target"] for r in rows if r["workload"] == w):
        rs = [r for r in rows if r["workload"] == w and r["target"] == t]
        med[t] = {k: statistics.median(float(r[k]) for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
        med[t]["non2xx"] = sum(int(r["non2xx"]) for r in rs)
    for t, m in med.items():
        base = med.get("nginx-tls" if t.endswith("-tls") else "nginx", {}).get("rps") or 1
        print(f"{w:10} {t:22} {m['rps']:10.0f} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} {m['rps']/base:6.2f} {m['non2xx']:7d}")
PY
}
