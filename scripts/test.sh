#!/usr/bin/env bash
# Installs every test dependency on a fresh Debian 12 machine with a Rust toolchain, then runs
# formatting, lints and all tests (unit and end-to-end) on one shared debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR=never

# Debian packages the tests use. (The end-to-end tests start real `cairn` processes; the OCI
# tests build a busybox image with umoci and skopeo; the benchmarks additionally use
# etcd-server and runc, see BENCHMARKS.md; iptables cuts a master off in the pre-vote test; promtool (prometheus) checks both metrics pages;
# the package tests run the real data services and check them with their own clients; the
# installer test runs a real sshd per host and checks its units with systemd-analyze.)
APT_PACKAGES=(iproute2 procps coreutils hostname busybox-static umoci skopeo iptables
  prometheus redis-server redis-tools etcd-server etcd-client postgresql-15 postgresql-client-15
  chromium chromium-driver openssh-server openssh-client systemd memcached libmemcached-tools)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q </dev/null
  $SUDO apt-get install -y -q "${missing[@]}" </dev/null
fi

# Toolchain components and the Wasm targets the test guests are built for.
if command -v rustup >/dev/null; then
  rustup component add clippy rustfmt </dev/null >/dev/null 2>&1 || true
  rustup target add wasm32-wasip1 wasm32-wasip2 </dev/null
fi

echo "== building Wasm test guests (tests/guests)"
# Core modules and CLI components from the root package; the wasi:http component
# (tests/guests/http-hello) for wasip2 only.
CARGO_TARGET_DIR="$PWD/target/guests" cargo build --release --locked \
  --manifest-path tests/guests/Cargo.toml --target wasm32-wasip1
CARGO_TARGET_DIR="$PWD/target/guests" cargo build --release --locked \
  --manifest-path tests/guests/Cargo.toml --target wasm32-wasip2 --workspace

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked -- --test-threads=2
echo "== all tests passed"
