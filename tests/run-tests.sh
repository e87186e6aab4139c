#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, protocol tests against the real
# daemons, and guest tests that boot QEMU. Needs root (TAP devices, namespaces) and the packages
# tests/setup.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Integration tests spawn the daemon binaries, so build them first (same profile as the tests).
cargo build --workspace --release --locked
cargo test --workspace --release --locked -- --test-threads="${BULKHEAD_TEST_THREADS:-2}"
# The harness, in its quick mode: keeps it working (no timed assertions).
target/release/bulkhead-bench --quick --out target/bench-quick > /dev/null
test -s target/bench-quick/report.json && test -s target/bench-quick/report.md && ls target/bench-quick/*.svg > /dev/null
target/release/bulkhead-bench --render target/bench-quick/report.json --out target/bench-rerender 2> /dev/null
cmp target/bench-quick/report.md target/bench-rerender/report.md
# Fuzz targets, briefly, starting from the committed corpora (cargo-fuzz on the stable
# toolchain: RUSTC_BOOTSTRAP lets it pass the sanitizer flags). New inputs go to a scratch
# corpus under target/ (libFuzzer writes into the first directory it is given), so a run
# leaves the committed, minimised corpora as they are.
command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked
for target in message memory_table inflight blk_request net_header net_rx ring_ops packed_ring control; do
  log="target/fuzz-$target.log"
  scratch="target/fuzz-corpus/$target"
  mkdir -p "$scratch"
  if ! RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz -O "$target" \
    "$scratch" "tests/fuzz/corpus/$target" -- \
    -max_total_time="${BULKHEAD_FUZZ_SECONDS:-20}" > "$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz target $target failed; the crashing input is under tests/fuzz/artifacts/$target" >&2
    exit 1
  fi
  tail -n 1 "$log"
done
