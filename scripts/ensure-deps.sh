#!/usr/bin/env bash
# Installs what building and testing Palisade needs on a fresh Debian/Ubuntu machine, and only
# what is missing: a C toolchain and cmake (pingora's zlib-ng build), pkg-config, curl, and
# redis-server (distributed rate-limit tests), promtool (the alert rules' check), Flask and
# Node.js (the differential tests run real Werkzeug and Node parsers as backends); then Rust
# via rustup if cargo is absent.
# Idempotent: a second run installs nothing.
set -euo pipefail

need=()
command -v cc >/dev/null || need+=(build-essential)
command -v cmake >/dev/null || need+=(cmake)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v curl >/dev/null || need+=(curl ca-certificates)
command -v redis-server >/dev/null || need+=(redis-server)
command -v python3 >/dev/null || need+=(python3)
command -v mmdblookup >/dev/null || need+=(mmdb-bin)
command -v node >/dev/null || need+=(nodejs)
# promtool checks the shipped Prometheus alert rules (Debian's prometheus package; it is
# installed without starting the server: RUNLEVEL=1 below).
command -v promtool >/dev/null || need+=(prometheus)
if ! /usr/bin/python3 -c 'import flask' 2>/dev/null && ! python3 -c 'import flask' 2>/dev/null; then
  need+=(python3-flask)
fi

if ((${#need[@]})); then
  echo "ensure-deps: installing ${need[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  $sudo env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "ensure-deps: cargo is in ~/.cargo/bin; add it to PATH (source ~/.cargo/env)" >&2
  else
    echo "ensure-deps: installing Rust (rustup, stable)" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
  fi
fi
