#!/usr/bin/env bash
# The discovery benchmarks of BENCHMARKS.md: endpoint added -> first request, endpoint killed
# under 1,000 req/s, balanced vs static path latency, proxy RSS in a mesh of 10,000 services.
# Installs oha if missing; starts every process it uses and stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v oha >/dev/null 2>&1 || cargo install --locked --quiet oha
# The proxy as shipped (profile dist); the CA, agent and harness in release.
cargo build --profile dist --quiet -p ward-proxy
cargo build --release --quiet -p ward-ca -p ward-agent -p ward-bench
cp target/dist/ward-proxy target/release/ward-proxy
echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores"
exec target/release/ward-bench discovery --oha "$(command -v oha)" \
    --seconds "${SECONDS_PER_POINT:-10}" "$@"
