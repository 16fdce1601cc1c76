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
# Builds the release binaries, needs softhsm2 (installed with apt when missing) and the
# PostgreSQL server binaries (initdb, pg_ctl: the `postgresql` package). The private
# PostgreSQL instance runs from a temporary folder on a free loopback port (as the postgres
# user when this runs as root) and is stopped at the end; a shared PostgreSQL is never
# touched. Everything is bounded: the load by SECONDS and by an operation count, every call by
# a timeout, the whole run by a watchdog.
set -euo pipefail
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

seconds="${1:-40}"
workers="${2:-12}"
target="${CARGO_TARGET_DIR:-$PWD/target}"
echo "==> building the release binaries (kms-server, kms-scaleout)"
cargo build --release --quiet -p kms-server -p softhsm-test
echo "==> 3 replicas, ${seconds} s of load from ${workers} clients, a SIGKILL and a PostgreSQL restart"
exec "$target/release/kms-scaleout" --server-bin "$target/release/kms-server" \
  --max-total-seconds $((seconds * 4 + 300)) demo --seconds "$seconds" --workers "$workers"
