#!/usr/bin/env bash
# The HSM-loss drill, with the commands the README's "Recovery" section gives custodians and
# officers: encrypt the Synthea sample, set up a 2-of-2 recovery domain (custodian-1 and
# custodian-2), back up, then destroy the token and the database, start on a new empty token
# and store, restore with both shares, grant again and decrypt every file.
#
# Usage: ./scripts/recovery-drill.sh [DATA_FOLDER]   (default: tests/data/synthea)
# State lives in ./.kms-drill (recreated each run); the custodians' key pairs and share files,
# which in real life never sit next to the server, in ./.kms-drill-custodians.
set -euo pipefail
cd "$(dirname "$0")/.."
INPUT="${1:-tests/data/synthea}"
STATE="$PWD/.kms-drill"
KEEP="$PWD/.kms-drill-custodians"

. scripts/lib.sh
ensure_softhsm
echo "==> building (release)"
cargo build --release --quiet -p kms-server -p kms-cli
BIN="$PWD/target/release"
rm -rf "$KEEP"
mkdir -p "$KEEP"
chmod 700 "$KEEP"

as() { local who="$1"; shift; "$BIN/kms-cli" --identity "$KMS_PKI/$who" "$@"; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

start_kms_server "$STATE"
export KMS_CUSTODIAN_PASSPHRASE="drill passphrase, not for production"

echo "==> data under a master key"
as officer-1 key create --alias drill > /dev/null
propose_and_approve grants propose --principal spiffe://hospital.test/app/app-1 --key drill \
  --operation generate-data-key,decrypt > /dev/null
as app-1 encrypt --key drill --context purpose=drill --in "$INPUT" --out "$STATE/encrypted" > /dev/null

echo "==> custodians make key pairs and register them"
for c in custodian-1 custodian-2; do
  as "$c" custodian keygen --out "$KEEP" --name "$c" > /dev/null
  as "$c" custodian register --recipient "$KEEP/$c.recipient" > /dev/null
done

echo "==> ceremony: officer-1 proposes 2-of-2, officer-2 approves"
CEREMONY="$(as officer-1 --output json recovery init --threshold 2 \
  --custodian spiffe://hospital.test/custodian/custodian-1 \
  --custodian spiffe://hospital.test/custodian/custodian-2 | json '["approval_id"]')"
CEREMONY="$(as officer-2 --output json approvals approve "$CEREMONY" | json '["result"]')"
for c in custodian-1 custodian-2; do
  as "$c" recovery fetch-share --out "$KEEP/$c.share" > /dev/null
  as "$c" recovery verify-share --key "$KEEP/$c.identity.age" --share "$KEEP/$c.share" > /dev/null
done
as officer-1 recovery close --ceremony "$CEREMONY" > /dev/null

echo "==> backup: proposed, approved, downloaded and verified"
APPROVAL="$(as officer-1 --output json recovery backup --out "$KEEP/kms.backup" | json '["approval_id"]')"
as officer-2 approvals approve "$APPROVAL" > /dev/null
as officer-1 recovery backup --approval "$APPROVAL" --out "$KEEP/kms.backup"
cp -r "$STATE/encrypted" "$KEEP/encrypted"

echo "==> the HSM and the database are lost"
kill "$SERVER_PID"; wait "$SERVER_PID" 2> /dev/null || true

start_kms_server "$STATE"
echo "==> restore on the new, empty token and store"
as officer-1 recovery restore --backup "$KEEP/kms.backup"
for c in custodian-2 custodian-1; do
  as "$c" recovery submit-share --key "$KEEP/$c.identity.age" --share "$KEEP/$c.share"
done
echo "==> grants are not in a backup: grant again, then decrypt everything"
propose_and_approve grants propose --principal spiffe://hospital.test/app/app-1 --key drill \
  --operation generate-data-key,decrypt > /dev/null
as app-1 decrypt --context purpose=drill --in "$KEEP/encrypted" --out "$STATE/decrypted" > /dev/null
diff -r "$INPUT" "$STATE/decrypted" > /dev/null
as auditor-1 audit verify
echo
echo "drill passed: every file of $INPUT decrypts after restoring into a new token"
