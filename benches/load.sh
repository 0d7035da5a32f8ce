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
out=${OUT_DIR:-$(mktemp -d /tmp/palisade-load.XXXXXX)}
# shellcheck source=benches/common.sh
. "$(dirname "$0")/common.sh"

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

wait_ready http://127.0.0.1:{18100,18102,18104,18106,18108,18110}/

targets=("nginx=http://127.0.0.1:18081" "palisade-passthrough=http://127.0.0.1:18100" "palisade-policy=http://127.0.0.1:18102" "palisade-managed=http://127.0.0.1:18104" "palisade-validate=http://127.0.0.1:18106")
[ "${MODSEC:-0}" = 1 ] && targets+=("nginx-modsec=http://127.0.0.1:18080")
# The token workload runs on the targets that accept it.
auth_targets=("nginx=http://127.0.0.1:18081" "palisade-passthrough=http://127.0.0.1:18100" "palisade-jwt=http://127.0.0.1:18110" "palisade-identity=http://127.0.0.1:18108")

results=$out/results.txt
: >"$results"
# One wrk run: the peer's bench.sh for its workloads, ours for the attack mix and tokens.
bench() { # url workload secs conns
  case "$2" in
    attack10) wrk_run "$1" "$2" "$3" "$4" "$here/attack-mix.lua" ;;
    getauth) wrk_run "$1" "$2" "$3" "$4" "$here/auth-get.lua" VARY=0 ;;
    getauthvar) wrk_run "$1" "$2" "$3" "$4" "$here/auth-get.lua" VARY=1 ;;
    *) "$peer/bench.sh" "$1" "$2" "$3" "$4" ;;
  esac
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

report "$results"
echo "raw results: $results"
