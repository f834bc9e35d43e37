#!/usr/bin/env bash
# Core benchmarks of BENCHMARKS.md: issuance throughput vs a raw ring loop, propagation latency,
# memory. Builds release binaries, starts every process it needs, stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --workspace --bins
B=target/release/ward-bench
echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores"
$B issuance --agents 8 --batch 50 --batches 40
$B propagation --samples 100
$B memory --workloads 100
