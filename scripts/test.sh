#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests, against a real SoftHSM2 token,
# real SQLite files and, when one is reachable, a real PostgreSQL server.
#
# PostgreSQL: KMS_TEST_POSTGRES_URL if set, else postgres://postgres@127.0.0.1:5432/test when
# a server answers there. Without one the PostgreSQL tests are skipped, and this says so.
# KMS_TEST_REQUIRE_POSTGRES=1 (set by CI) makes a missing PostgreSQL a failure instead.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_softhsm
export KMS_HSM_MODULE="$(softhsm_module)"
# The Python example (examples/python) runs in the integration tests against a real server.
ensure_python_example

if [ -z "${KMS_TEST_POSTGRES_URL:-}" ]; then
  if python3 -c 'import socket; socket.create_connection(("127.0.0.1", 5432), 1).close()' 2> /dev/null; then
    export KMS_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/test"
  fi
fi
if [ -n "${KMS_TEST_POSTGRES_URL:-}" ]; then
  echo "==> PostgreSQL tests: ON ($KMS_TEST_POSTGRES_URL)"
elif [ "${KMS_TEST_REQUIRE_POSTGRES:-}" = "1" ]; then
  echo "KMS_TEST_REQUIRE_POSTGRES=1 but no PostgreSQL is reachable" >&2
  exit 1
else
  echo "==> PostgreSQL tests: SKIPPED (no server at 127.0.0.1:5432 and KMS_TEST_POSTGRES_URL unset)"
fi

# Each test process keeps its throw-away SoftHSM2 token folder until it exits (the PKCS#11
# library holds it open); remove those of earlier runs.
find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'kms-softhsm-*' -mmin +60 -exec rm -rf {} + 2> /dev/null || true

cargo test --workspace --all-targets "$@"

if [ -z "${KMS_TEST_POSTGRES_URL:-}" ]; then
  echo "NOTE: the PostgreSQL half of every store test was SKIPPED (see above)."
fi
