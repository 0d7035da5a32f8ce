#!/usr/bin/env bash
# TLS at the edge, side by side in one run on loopback: nginx terminating TLS vs Palisade
# passthrough terminating TLS (both in front of the peer backend, one worker each pinned to
# CPU ${PROXY_CPU:-1}; wrk and the backend share CPU 0). The same ECDSA P-256 certificate,
# TLS 1.3, X25519 (what both pick with wrk's OpenSSL client).
#
# Workloads:
#   handshake  GET with `Connection: close`: every request is a new connection and a full
#              TLS 1.3 handshake (wrk does not resume sessions), so rps = handshakes/s
#   post1k     keep-alive HTTPS, 1 KB JSON POST (the peer's post-json.lua); the same over
#              cleartext (nginx :18081, Palisade passthrough) in the same rounds, so the cost
#              of TLS shows apart from the cost of proxying
# Runs are interleaved (nginx, Palisade, nginx, …); the report gives medians and ratios.
#
#   benches/tls-load.sh [ROUNDS] [SECONDS] [CONNECTIONS]     (defaults 5 8 50)
#   PALISADE_BIN=/path/to/palisade benches/tls-load.sh
set -euo pipefail
rounds=${1:-5} secs=${2:-8} conns=${3:-50}
workloads=${WORKLOADS:-handshake post1k}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer=${PEER_SCRIPTS:-$root/../shared/peer}
proxy_cpu=${PROXY_CPU:-1}
bin=${PALISADE_BIN:-$root/target/release/palisade}
out=${OUT_DIR:-$(mktemp -d /tmp/palisade-tls-load.XXXXXX)}
mkdir -p "$out"/{logs,tmp}

[ -x "$bin" ] || (cd "$root" && cargo build --release --bin palisade)
[ -x "$peer/start.sh" ] || { echo "peer scripts not found at $peer (set PEER_SCRIPTS)" >&2; exit 2; }
peer_dir=${PEER_DIR:-/tmp/palisade-peer}
started_peers=1
if [ -s "$peer_dir/proxy.pid" ] && kill -0 "$(cat "$peer_dir/proxy.pid")" 2>/dev/null; then
  started_peers=0
fi
"$peer/start.sh" >/dev/null

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -s "$out/nginx-tls.pid" ]; then kill "$(cat "$out/nginx-tls.pid")" 2>/dev/null || true; fi
  if [ "$started_peers" = 1 ]; then "$peer/stop.sh" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# One certificate for both.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench.example -addext "subjectAltName=DNS:bench.example,IP:127.0.0.1" \
  -keyout "$out/key.pem" -out "$out/cert.pem" 2>/dev/null

cat >"$out/nginx-tls.conf" <<EOF
worker_processes 1;
pid $out/nginx-tls.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $out/tmp/body;
  proxy_temp_path $out/tmp/proxy;
  fastcgi_temp_path $out/tmp/fastcgi;
  uwsgi_temp_path $out/tmp/uwsgi;
  scgi_temp_path $out/tmp/scgi;
  upstream backend {
    server 127.0.0.1:18090;
    keepalive 256;
  }
  server {
    listen 127.0.0.1:18443 ssl reuseport backlog=4096;
    ssl_certificate $out/cert.pem;
    ssl_certificate_key $out/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
taskset -c "$proxy_cpu" nginx -p "$out" -c "$out/nginx-tls.conf" -e "$out/logs/error.log"

cat >"$out/palisade-tls.yaml" <<EOF
listeners:
  - address: "127.0.0.1:18444"
    tls:
      certificates: [{cert: cert.pem, key: key.pem}]
admin:
  address: "127.0.0.1:18445"
logging:
  level: warn
body:
  oversize: continue
http:
  max_connections_per_ip: 0
upstreams:
  backend:
    targets: ["127.0.0.1:18090"]
routes:
  - name: all
    upstream: backend
EOF
taskset -c "$proxy_cpu" "$bin" run --config "$out/palisade-tls.yaml" --threads 1 >"$out/palisade.log" 2>&1 &
pids+=($!)
# The cleartext baseline: Palisade passthrough.
sed -e 's/18100/18446/; s/18101/18447/' "$root/examples/passthrough.yaml" >"$out/passthrough.yaml"
taskset -c "$proxy_cpu" "$bin" run --config "$out/passthrough.yaml" --threads 1 >"$out/passthrough.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:18446/" && break; sleep 0.1; done

for port in 18443 18444; do
  for _ in $(seq 100); do curl -fsSk -o /dev/null "https://127.0.0.1:$port/" && break; sleep 0.1; done
done

cat >"$out/close.lua" <<'EOF'
-- A GET on a new connection each time: every request is a full TLS handshake.
wrk.method = "GET"
wrk.path = "/api/v1/activities?limit=25"
wrk.headers["Connection"] = "close"
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
EOF

results=$out/results.txt
: >"$results"
bench() { # url workload secs
  local script
  case "$2" in
    handshake) script=$out/close.lua ;;
    post1k) script=$peer/post-json.lua; export BODY_BYTES=1024 ;;
    *) echo "unknown workload $2" >&2; exit 2 ;;
  esac
  local o
  o=$(taskset -c "${BENCH_CPU:-0}" wrk -t1 -c"$conns" -d"${3}s" --latency -s "$script" "$1/")
  python3 - "$1" "$2" "$o" <<'PY'
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

for w in $workloads; do
  targets=("nginx-tls=https://127.0.0.1:18443" "palisade-tls=https://127.0.0.1:18444")
  if [ "$w" = post1k ]; then
    targets+=("nginx=http://127.0.0.1:18081" "palisade=http://127.0.0.1:18446")
  fi
  for t in "${targets[@]}"; do bench "${t#*=}" "$w" 2 >/dev/null; done # warm-up
  for r in $(seq "$rounds"); do
    for t in "${targets[@]}"; do
      line=$(bench "${t#*=}" "$w" "$secs")
      echo "round=$r target=${t%%=*} $line" | tee -a "$results"
    done
  done
done
curl -s http://127.0.0.1:18445/metrics | grep -E '^palisade_tls_handshakes_total' >"$out/handshakes.txt" || true

python3 - "$results" <<'PY'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in l.split()) for l in open(sys.argv[1]) if l.strip()]
print("\nmedians over rounds (ratio = rps / nginx rps over the same transport, same workload, same run)")
print(f"{'workload':10} {'target':14} {'rps':>10} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6}")
for w in dict.fromkeys(r["workload"] for r in rows):
    med = {}
    for t in dict.fromkeys(r["target"] for r in rows if r["workload"] == w):
        rs = [r for r in rows if r["workload"] == w and r["target"] == t]
        med[t] = {k: statistics.median(float(r[k]) for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
    for t, m in med.items():
        base = med.get("nginx-tls" if t.endswith("-tls") else "nginx", {}).get("rps") or 1
        print(f"{w:10} {t:14} {m['rps']:10.0f} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} {m['rps']/base:6.2f}")
PY
echo "Palisade handshakes by version/ALPN: $(tr '\n' ' ' <"$out/handshakes.txt")"
echo "raw results: $results"
