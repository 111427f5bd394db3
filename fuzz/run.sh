#!/usr/bin/env bash
# Runs one fuzz target with coverage guidance on the stable toolchain (cargo-fuzz needs
# nightly): the sanitizer-coverage instrumentation is applied to the target artifacts only
# (hence --target), which is what libFuzzer needs to steer its inputs.
# Usage: fuzz/run.sh frame_decode|meta_rpc_decode|nbd_request_decode|iscsi_pdu_decode [seconds]
set -euo pipefail
cd "$(dirname "$0")"
target="${1:?usage: fuzz/run.sh TARGET [SECONDS]}"
seconds="${2:-60}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tandem-fuzz-target}"
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks" \
  cargo build --release --target "$triple" --bin "$target"
mkdir -p "corpus/$target"
"$CARGO_TARGET_DIR/$triple/release/$target" -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 "corpus/$target"
