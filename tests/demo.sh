#!/usr/bin/env bash
# The demo: install what is needed (Debian packages; the guest kernel is fetched on first run),
# build the daemons, and boot a QEMU guest on them. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
cargo build --workspace --release --locked
exec target/release/bulkhead-demo
