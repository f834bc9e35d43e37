#!/usr/bin/env bash
# Kubernetes benchmarks of BENCHMARKS.md: 10,000 pods on 100 nodes converged by the CA's identity
# controller against an in-process fake API server, bytes sent to one agent per pod change, and
# pod created -> SVID latency. Builds release binaries, starts every process it needs, stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --workspace --bins
echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores"
target/release/ward-bench k8s --pods 10000 --nodes 100 --samples 20
