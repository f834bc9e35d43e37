#!/usr/bin/env bash
# The capture benchmark of BENCHMARKS.md: captured path vs explicit listeners vs direct, in
# network namespaces with the real nftables rules of `ward-proxy init` (two pods, a node).
# Needs root. Installs what it needs (nginx, nftables, oha), starts every process it uses and
# stops them all (the namespaces are deleted at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v nft >/dev/null 2>&1 || need+=(nftables)
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    (systemctl stop nginx || pkill -x nginx || true) >/dev/null 2>&1
fi
command -v oha >/dev/null 2>&1 || cargo install --locked --quiet oha

# The proxy as shipped (profile dist: fat LTO, one codegen unit); the harness in release.
cargo build --profile dist --quiet -p ward-proxy
cargo build --release --quiet -p ward-bench
echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores"
exec target/release/ward-bench capture --ward-proxy "$PWD/target/dist/ward-proxy" \
    --oha "$(command -v oha)" --seconds "${SECONDS_PER_POINT:-10}" "$@"
