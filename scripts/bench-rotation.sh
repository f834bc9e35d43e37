#!/usr/bin/env bash
# Rotation figures of BENCHMARKS.md: propagation of authority changes (one real agent with a
# Workload API stream; 200 simulated agents on their sync streams), and the rotation proof
# (prepare → CA restart → activate → taint → revoke under load through two proxies) at a rate
# above 1,000 requests/s. Builds release binaries, starts every process it needs, stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --workspace --bins
echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores"
target/release/ward-bench rotation --agents 200 --rounds 5
WARD_ROTATION_RATE=${WARD_ROTATION_RATE:-1500} WARD_ROTATION_STEP_MS=${WARD_ROTATION_STEP_MS:-3000} \
  cargo test --release --quiet -p ward-ca --test rotation -- --nocapture 2>&1 | grep -E "rotation under load|test result"
