#!/usr/bin/env bash
# End-to-end load comparison on loopback, side by side in one run:
#   nginx (no WAF) · Palisade passthrough · Palisade default policy · Palisade with the managed
#   rule sets (the default config's inspection) · Palisade with JSON Schema validation
#   [· nginx+ModSecurity+CRS with MODSEC=1]
# Workloads: get (typical API GET), post1k and post32k (JSON bodies; the managed target's
# route allows 32 KB bodies so they are inspected whole, not refused by the 8 KiB size rule),
# attack10 (the GET with one request in ten an attack: 403 from a WAF, counted in non2xx),
# getauth (the GET with a bearer token, on nginx, Palisade passthrough, Palisade with the
# token alone and Palisade with identity: JWT verification, Cedar authorization and a
# per-subject rate limit; the same request repeated, so Cedar's decision is cached), and
# getauthvar (the same with another activity in every request: each decision is Cedar's).
# Every proxy runs one worker pinned to CPU ${PROXY_CPU:-1}; the backend and wrk share CPU 0
# (../shared/peer conventions). Runs are interleaved (A B C A B C …) so drift on this shared,
# noisy machine hits all targets alike; the report gives per-target medians and ratios to nginx.
#
#   benches/load.sh [ROUNDS] [SECONDS] [CONNECTIONS]        (defaults 5 8 50)
#   WORKLOADS="get post1k post32k attack10" MODSEC=1 benches/load.sh
#   PALISADE_BIN=/path/to/other/palisade benches/load.sh     (e.g. a build of an older commit)
set -euo pipefail
rounds=${1:-5} secs=${2:-8} conns=${3:-50}
workloads=${WORKLOADS:-get post1k post32k attack10 getauth getauthvar}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer=${PEER_SCRIPTS:-$root/../shared/peer}
proxy_cpu=${PROXY_CPU:-1}
bin=${PALISADE_BIN:-$root/target/release/palisade}
out=${OUT_DIR:-$(mktemp -d /tmp/palisade-load.XXXXXX)}
mkdir -p "$out"

[ -x "$bin" ] || (cd "$root" && cargo build --release --bin palisade)
[ -x "$peer/start.sh" ] || { echo "peer scripts not found at $peer (set PEER_SCRIPTS)" >&2; exit 2; }
# Peers already running (someone else's) are used and left running; peers this script starts
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
  if [ "$started_peers" = 1 ]; then "$peer/stop.sh" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

start_palisade() { # name config
  local name=$1 cfg=$2
  taskset -c "$proxy_cpu" "$bin" run --config "$cfg" --threads 1 >"$out/$name.log" 2>&1 &
  pids+=($!)
}

# Passthrough: no stage, bodies streamed unread.
start_palisade passthrough "$root/examples/passthrough.yaml"
# Default policy: the embedded default's inspection settings, in front of the same backend.
sed -e 's/18100/18102/; s/18101/18103/; s/oversize: continue/oversize: block/' \
  "$root/examples/passthrough.yaml" >"$out/policy.yaml"
start_palisade policy "$out/policy.yaml"
# Managed rule sets on every request; bodies up to 32 KB inspected whole (the size rule of
# `core` answers larger ones).
sed -e 's/        - name: core$/        - name: core\n          disabled_rules: [core-size-body]/' \
  "$root/examples/managed.yaml" >"$out/managed.yaml"
start_palisade managed "$out/managed.yaml"
# JSON Schema request validation (query parameters, 1 KB JSON body), no rule sets.
start_palisade validate "$root/examples/validation-bench.yaml"

# Identity at the edge: bearer token (ES256) + Cedar (examples/fitness) + claim:sub limit.
start_palisade identity "$root/examples/identity-bench.yaml"
# The same without Cedar: what the bearer token alone costs.
sed -e 's/18108/18110/; s/18109/18111/' -e '/^      authorize:/,/^rate_limits:/{/^rate_limits:/!d}' \
  -e "s#fitness/#$root/examples/fitness/#g" "$root/examples/identity-bench.yaml" >"$out/jwt.yaml"
start_palisade jwt "$out/jwt.yaml"
TOKEN=$("$bin" token --key "$root/examples/fitness/dev-signing-key.pem" --kid fitness-dev-1 \
  --iss https://id.fitness.test --aud fitness-api --sub alice --group athletes \
  --scope activities --ttl 2h)
export TOKEN

for port in 18100 18102 18104 18106 18108 18110; do
  for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done

targets=("nginx=http://127.0.0.1:18081" "palisade-passthrough=http://127.0.0.1:18100" "palisade-policy=http://127.0.0.1:18102" "palisade-managed=http://127.0.0.1:18104" "palisade-validate=http://127.0.0.1:18106")
[ "${MODSEC:-0}" = 1 ] && targets+=("nginx-modsec=http://127.0.0.1:18080")
# The token workload runs on the targets that accept it.
auth_targets=("nginx=http://127.0.0.1:18081" "palisade-passthrough=http://127.0.0.1:18100" "palisade-jwt=http://127.0.0.1:18110" "palisade-identity=http://127.0.0.1:18108")

results=$out/results.txt
: >"$results"
# One wrk run: the peer's bench.sh for its workloads, ours for the attack mix (same output).
bench() { # url workload secs conns
  if [ "$2" = attack10 ] || [ "${2#getauth}" != "$2" ]; then
    local o script=$here/attack-mix.lua vary=0
    [ "${2#getauth}" != "$2" ] && script=$here/auth-get.lua
    [ "$2" = getauthvar ] && vary=1
    o=$(VARY=$vary taskset -c "${BENCH_CPU:-0}" wrk -t1 -c"$4" -d"${3}s" --latency -s "$script" "$1")
    python3 - "$1" "$o" "$2" <<'PY'
import re, sys
url, o = sys.argv[1], sys.argv[2]
def ms(v):
    n = float(re.sub(r"[a-z]+$", "", v))
    return n / 1000 if v.endswith("us") else n * 1000 if v.endswith("s") and not v.endswith("ms") else n
rps = re.search(r"Requests/sec:\s+([\d.]+)", o).group(1)
lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", o, re.M))
non = re.search(r"Non-2xx or 3xx responses: (\d+)", o)
print(f"url={url} workload={sys.argv[3]} rps={rps} p50_ms={ms(lat['50'])} p99_ms={ms(lat['99'])} non2xx={non.group(1) if non else 0}")
PY
  else
    "$peer/bench.sh" "$1" "$2" "$3" "$4"
  fi
}

for w in $workloads; do
  ts=("${targets[@]}")
  [ "${w#getauth}" != "$w" ] && ts=("${auth_targets[@]}")
  for t in "${ts[@]}"; do bench "${t#*=}/" "$w" 2 "$conns" >/dev/null; done # warm-up
  for r in $(seq "$rounds"); do
    for t in "${ts[@]}"; do
      line=$(bench "${t#*=}/" "$w" "$secs" "$conns")
      echo "round=$r target=${t%%=*} $line" | tee -a "$results"
    done
  done
done

python3 - "$results" <<'PY'
import re, statistics, sys
rows = [dict(kv.split("=", 1) for kv in l.split()) for l in open(sys.argv[1]) if l.strip()]
print("\nmedians over rounds (ratio = rps / nginx rps, same workload, same run)")
print(f"{'workload':8} {'target':22} {'rps':>10} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6} {'non2xx':>7}")
for w in dict.fromkeys(r["workload"] for r in rows):
    med = {}
    for t in dict.fromkeys(r["target"] for r in rows if r["workload"] == w):
        rs = [r for r in rows if r["workload"] == w and r["target"] == t]
        med[t] = {k: statistics.median(float(r[k]) for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
        med[t]["non2xx"] = sum(int(r["non2xx"]) for r in rs)
    base = med.get("nginx", {}).get("rps") or 1
    for t, m in med.items():
        print(f"{w:8} {t:22} {m['rps']:10.0f} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} {m['rps']/base:6.2f} {m['non2xx']:7d}")
PY
echo "raw results: $results"
