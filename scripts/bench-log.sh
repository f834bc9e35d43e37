#!/usr/bin/env bash
# Access-log cost of BENCHMARKS.md: the two-hop proxy topology with the log off, on (default)
# and on as evidence, one after the other in one run. Installs nginx and oha if missing.
#   BASELINE=/path/to/older/ward-proxy ./scripts/bench-log.sh   # also an earlier build
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
    (systemctl stop nginx || pkill -x nginx || true) >/dev/null 2>&1
fi
command -v oha >/dev/null 2>&1 || cargo install --locked --quiet oha
cargo build --profile dist --quiet -p ward-proxy
cargo build --release --quiet -p ward-bench
echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores"
exec target/release/ward-bench access-log --ward-proxy target/dist/ward-proxy \
    ${BASELINE:+--baseline "$BASELINE"} --seconds "${SECONDS_PER_POINT:-10}" "$@"
