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
out=${OUT_DIR:-$(mktemp -d /tmp/palisade-tls-load.XXXXXX)}
mkdir -p "$out"/{logs,tmp}
extra_cleanup() {
  if [ -s "$out/nginx-tls.pid" ]; then kill "$(cat "$out/nginx-tls.pid")" 2>/dev/null || true; fi
}
# shellcheck source=benches/common.sh
. "$(dirname "$0")/common.sh"

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
start_palisade palisade-tls "$out/palisade-tls.yaml"
# The cleartext baseline: Palisade passthrough.
sed -e 's/18100/18446/; s/18101/18447/' "$root/examples/passthrough.yaml" >"$out/passthrough.yaml"
start_palisade passthrough "$out/passthrough.yaml"
wait_ready http://127.0.0.1:18446/ https://127.0.0.1:18443/ https://127.0.0.1:18444/

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
  case "$2" in
    handshake) wrk_run "$1/" "$2" "$3" "$conns" "$out/close.lua" ;;
    post1k) wrk_run "$1/" "$2" "$3" "$conns" "$peer/post-json.lua" BODY_BYTES=1024 ;;
    *) echo "unknown workload $2" >&2; exit 2 ;;
  esac
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

report "$results"
echo "Palisade handshakes by version/ALPN: $(tr '\n' ' ' <"$out/handshakes.txt")"
echo "raw results: $results"
