#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/) for a bounded time each and fails on any crash,
# timeout (one input over 10 s) or out-of-memory (2 GiB): the fuzzers are libFuzzer with
# AddressSanitizer, on nightly Rust. Seeds are fuzz/seeds/<target> (from the tests' inputs);
# what the fuzzer finds is kept in fuzz/corpus/<target> (not committed), a crash in
# fuzz/artifacts/<target>/ (run it again with `cargo +nightly fuzz run <target> <file>`, and
# make it a regression test).
#
#   FUZZ_SECONDS=30 ./scripts/fuzz.sh            # every target, 30 s each (CI: 20 s)
#   FUZZ_SECONDS=600 ./scripts/fuzz.sh policy    # one target, longer
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-30}"
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
cd fuzz
cargo +nightly fuzz build -O
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t"
    echo "== fuzz $t for ${seconds}s"
    if ! cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        2> "corpus/$t.log"; then
        tail -40 "corpus/$t.log"
        failed+=("$t")
    else
        grep -aE "^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+[[:space:]]+DONE)" "corpus/$t.log" | tr '\n' ' '
        echo
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each without a finding"
