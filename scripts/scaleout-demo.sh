#!/usr/bin/env bash
# Horizontal scale-out on one machine: three kms-server replicas on one private PostgreSQL
# database and one SoftHSM2 token, a mixed load through all three (data keys, decryption,
# rotation, raced grant approvals, tokenization), one replica killed with SIGKILL and started
# again, PostgreSQL stopped and started under load; then every ciphertext a client received
# is decrypted through every replica, every key's version history is compared across
# replicas, the audit trail is verified and searched for every acknowledged request id.
#
#   ./scripts/scaleout-demo.sh [SECONDS=40] [WORKERS=12]
#
# SECONDS (of load; the faults happen at fixed fractions of it) is an integer 20..=600, WORKERS
# (concurrent clients) an integer 1..=64; both are checked before anything is built. Ctrl-C
# (SIGINT) or SIGTERM stops every replica and the private PostgreSQL and removes the
# temporary folders (PostgreSQL data, PKI, SoftHSM2 token, logs), then exits non-zero.
#
# Builds the release binaries, needs softhsm2 (installed with apt when missing) and the
# PostgreSQL server binaries (initdb, pg_ctl: the `postgresql` package). The private
# PostgreSQL instance runs from a temporary folder on a free loopback port (as the postgres
# user when this runs as root) and is stopped at the end; a shared PostgreSQL is never
# touched. Everything is bounded: the load by SECONDS and by an operation count, every call by
# a timeout, the whole run by a watchdog.
set -euo pipefail

usage() {
  echo "usage: $0 [SECONDS=40] [WORKERS=12]" >&2
  echo "  SECONDS: seconds of load, an integer 20..=600; WORKERS: concurrent clients, an integer 1..=64" >&2
}
# An integer in min..=max (decimal digits only, no sign, no leading zero, at most 6 digits so
# that the shell's arithmetic cannot overflow), or a usage error.
check_int() { # name value min max
  local name="$1" value="$2" min="$3" max="$4"
  if ! [[ "$value" =~ ^(0|[1-9][0-9]{0,5})$ ]] || ((value < min || value > max)); then
    echo "$0: $name must be an integer in $min..=$max, not '$value'" >&2
    usage
    exit 2
  fi
}
case "${1:-}" in
  -h | --help)
    usage
    exit 0
    ;;
esac
if (($# > 2)); then
  echo "$0: at most two arguments" >&2
  usage
  exit 2
fi
seconds="${1:-40}"
workers="${2:-12}"
check_int SECONDS "$seconds" 20 600
check_int WORKERS "$workers" 1 64

cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_softhsm
export KMS_HSM_MODULE="$(softhsm_module)"

if ! ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 && ! command -v pg_config > /dev/null; then
  echo "==> installing the PostgreSQL server binaries (for a private instance)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql > /dev/null
fi

target="${CARGO_TARGET_DIR:-$PWD/target}"
echo "==> building the release binaries (kms-server, kms-scaleout)"
cargo build --release --quiet -p kms-server -p softhsm-test
echo "==> 3 replicas, ${seconds} s of load from ${workers} clients, a SIGKILL and a PostgreSQL restart"
exec "$target/release/kms-scaleout" --server-bin "$target/release/kms-server" \
  --max-total-seconds $((seconds * 4 + 300)) demo --seconds "$seconds" --workers "$workers"
