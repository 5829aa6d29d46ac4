#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 10), starting from the committed seeds in
# fuzz/corpus/TARGET (never written to: what a run finds goes to a scratch folder). A crash stops the run with the
# input saved under fuzz/artifacts/TARGET. `make test` runs it briefly; `make fuzz` for longer (FUZZ_SECONDS).
# cargo-fuzz is installed into a cache outside the repo, keyed by its version.
set -euo pipefail
seconds=${1:-10}
root=$(cd "$(dirname "$0")/.." && pwd)
version=0.13.2
tools="${CAMELID_CACHE:-$HOME/.cache/camelid}/cargo-fuzz-$version"
if ! [ -x "$tools/bin/cargo-fuzz" ]; then
  cargo install cargo-fuzz --version "=$version" --locked --root "$tools"
fi
export PATH="$tools/bin:$PATH"
# cargo-fuzz passes `-Z` flags to rustc; the pinned stable toolchain accepts them this way, so no nightly is needed.
# No sanitizer: the code under test is safe Rust, and libFuzzer still catches panics, aborts, hangs and memory blowups.
export RUSTC_BOOTSTRAP=1
# 16 codegen units: a much faster build of the large dependency tree (libtorch's bindings, kube) for somewhat slower
# runs, which is the right trade for seconds-long runs in `make test`.
build=(--sanitizer none --codegen-units 16 --target-dir "$root/target/fuzz")
cd "$root/fuzz"
cargo fuzz build "${build[@]}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list); do
  mkdir -p "$scratch/$target"
  log="$scratch/$target.log"
  status=0
  cargo fuzz run "${build[@]}" "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -max_len=262144 -print_final_stats=1 >"$log" 2>&1 ||
    status=$?
  runs=$(grep -oP '^stat::number_of_executed_units:\s*\K[0-9]+' "$log" || echo "?")
  if [ "$status" != 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz: $target FAILED after $runs inputs; the input is in fuzz/artifacts/$target" >&2
    exit 1
  fi
  echo "fuzz: $target: $runs inputs in ${seconds}s, no crash"
done
