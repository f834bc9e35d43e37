#!/usr/bin/env bash
# The egress benchmark of BENCHMARKS.md: the sidecar's egress check (SNI read, match, resolve
# from cache) on new TLS connections against the same capture with no egress policy, in
# network namespaces with the real nftables rules of `ward-proxy init`. Needs root. Installs
# what it needs (nginx, nftables, dnsmasq, oha), starts every process it uses and stops them.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v dnsmasq >/dev/null 2>&1 || need+=(dnsmasq-base)
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    (systemctl stop nginx || pkill -x nginx || true) >/dev/null 2>&1
fi
command -v oha >/dev/null 2>&1 || cargo install --locked --quiet oha

# The proxy as shipped (profile dist); the harness in release.
cargo build --profile dist --quiet -p ward-proxy
cargo build --release --quiet -p ward-bench
echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores"
exec target/release/ward-bench egress --ward-proxy "$PWD/target/dist/ward-proxy" \
    --oha "$(command -v oha)" --seconds "${SECONDS_PER_POINT:-10}" "$@"
