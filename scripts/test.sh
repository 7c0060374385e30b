#!/usr/bin/env bash
# Runs every promgate check from a fresh machine: installs what the tests need
# (Debian's prometheus and prometheus-node-exporter, cargo-fuzz), then format, lints,
# the whole test suite (unit, property, HTTP and end-to-end tests that start the real
# binaries and a real Prometheus on 127.0.0.1), and a short fuzz run of the decoder.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${PROMGATE_FUZZ_SECONDS:-20}"

step() { printf '\n==> %s\n' "$*"; }

missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v prometheus-node-exporter >/dev/null || missing+=(prometheus-node-exporter)
if ((${#missing[@]})); then
  step "installing ${missing[*]} from Debian's packages"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
prometheus --version 2>&1 | head -n 1

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings

step "cargo test (unit, property, HTTP, end to end with Prometheus)"
tmp="${TMPDIR:-/tmp}"
started="$(mktemp)"
cargo test --release --workspace
# The tests leave their data directories in $TMPDIR for a look when one fails (the WAL
# crash tests up to ~300 MB each). They all passed: give back the space of this run's.
find "$tmp" -maxdepth 1 \( -name 'promgate-test-*' -o -name 'promgate-wal-dma-*' \) \
  -newer "$started" -exec rm -rf --one-file-system {} + || echo "note: some test data in $tmp was not removed"
rm -f "$started"

if command -v systemd-analyze >/dev/null; then
  step "systemd unit verifies"
  unit_dir="$(mktemp -d)"
  for unit in promgate-agent promgate-server; do
    sed "s|/usr/bin/promgate|$PWD/target/release/promgate|g" "systemd/$unit.service" >"$unit_dir/$unit.service"
    systemd-analyze verify "$unit_dir/$unit.service"
  done
  rm -rf "$unit_dir"
fi

step "fuzz smoke run of the decoder (${FUZZ_SECONDS}s)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
# cargo fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the one stable toolchain here use them.
(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode "$corpus" seeds/decode -- -max_total_time="$FUZZ_SECONDS")
echo "fuzz: no crash in ${FUZZ_SECONDS}s"

step "fuzz smoke run of the ship frame and archive validation (${FUZZ_SECONDS}s)"
ship_corpus="$(mktemp -d)"
trap 'rm -rf "$corpus" "$ship_corpus"' EXIT
(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ship_frame "$ship_corpus" seeds/ship_frame -- -max_total_time="$FUZZ_SECONDS")
echo "fuzz: no crash in ${FUZZ_SECONDS}s"
