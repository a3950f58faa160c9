#!/usr/bin/env bash
# Runs the whole test suite: unit tests, trybuild UI tests, property tests and
# the integration tests against real redis-server processes that the tests
# start themselves on free loopback ports. Installs redis-server first when
# it is missing (Debian/Ubuntu); with CACHE_TEST_SERVER=valkey, the tests
# start valkey-server instead, installed from Debian's backports if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing the Debian package redis-server" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
  # The package starts a system service on 6379; the tests do not use it.
fi
redis-server --version
# CACHE_TEST_SERVER=valkey: the servers the tests start are Valkey's
# (Debian 12 ships valkey-server 8 in its backports suite).
if [ "${CACHE_TEST_SERVER:-}" = valkey ] && ! command -v valkey-server >/dev/null 2>&1; then
  . /etc/os-release
  echo "valkey-server not found: installing it from ${VERSION_CODENAME}-backports" >&2
  echo "deb http://deb.debian.org/debian ${VERSION_CODENAME}-backports main" |
    $sudo tee "/etc/apt/sources.list.d/${VERSION_CODENAME}-backports.list" >/dev/null
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -t "${VERSION_CODENAME}-backports" valkey-server >/dev/null
fi
if [ "${CACHE_TEST_SERVER:-}" = valkey ]; then valkey-server --version; fi

# The UI tests' pass cases are built by trybuild in a workspace of its own,
# which does not inherit ours' profile: without this, each of them links
# every dependency's full debug info (3 GB in all).
export CARGO_PROFILE_DEV_DEBUG=line-tables-only

# Every test binary runs even when one fails, so that a run shows every
# failure; the exit status is non-zero if any test failed.
cargo test --workspace --all-features --no-fail-fast "$@"
