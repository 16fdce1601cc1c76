#!/usr/bin/env bash
# The main job on real input: start the KMS on a fresh SoftHSM2 token, SQLite database and
# development PKI (everything over mutual TLS, as in production), create a master key as a
# security officer, envelope-encrypt every Synthea sample file as an application, decrypt them
# all, check they are byte-identical, check an officer cannot decrypt, verify the audit trail
# as an auditor, print a summary, stop the server.
#
# Usage: ./scripts/demo.sh [DATA_FOLDER]   (default: tests/data/synthea)
# State lives in ./.kms-demo (token, database, PINs, PKI, logs, outputs); it is recreated each run.
set -euo pipefail
cd "$(dirname "$0")/.."
INPUT="${1:-tests/data/synthea}"
STATE="$PWD/.kms-demo"

. scripts/lib.sh
ensure_softhsm

echo "==> building (release)"
cargo build --release --quiet -p kms-server -p kms-cli
BIN="$PWD/target/release"

start_kms_server "$STATE"

echo "==> creating master key 'synthea-demo' inside the HSM (as officer-1)"
"$BIN/kms-cli" --identity "$KMS_PKI/officer-1" key create --alias synthea-demo --description "demo: Synthea sample" --tag purpose=demo

echo "==> granting app-1 data keys and decryption under 'synthea-demo', only with dataset=synthea-sample"
echo "    (officer-1 proposes, officer-2 approves: dual control)"
propose_and_approve grants propose --principal spiffe://hospital.test/app/app-1 --key synthea-demo \
  --operation generate-data-key,decrypt --context-equals dataset=synthea-sample --require-context-key purpose > /dev/null

CONTEXT=(--context dataset=synthea-sample --context purpose=demo)
echo "==> envelope-encrypting every file of $INPUT (as app-1)"
"$BIN/kms-cli" --output json encrypt --key synthea-demo "${CONTEXT[@]}" --in "$INPUT" --out "$STATE/encrypted" > "$STATE/encrypt.json"
echo "==> decrypting them again"
"$BIN/kms-cli" --output json decrypt "${CONTEXT[@]}" --in "$STATE/encrypted" --out "$STATE/decrypted" > "$STATE/decrypt.json"

echo "==> checking byte equality"
diff -r "$INPUT" "$STATE/decrypted" > /dev/null
if grep -rq "Synthea\|Patient" "$STATE/encrypted"; then echo "plaintext found in ciphertext"; exit 1; fi

echo "==> checking separation of duties: officer-1 may not decrypt"
if "$BIN/kms-cli" --identity "$KMS_PKI/officer-1" decrypt "${CONTEXT[@]}" --in "$STATE/encrypted" --out "$STATE/officer-try" > "$STATE/officer-try.log" 2>&1; then
  echo "an officer decrypted data"; exit 1
fi
grep -q "PermissionDenied" "$STATE/officer-try.log" || { echo "officer refused for another reason:"; cat "$STATE/officer-try.log"; exit 1; }
rm -rf "$STATE/officer-try"
echo "==> verifying the audit trail (as auditor-1)"
"$BIN/kms-cli" --identity "$KMS_PKI/auditor-1" --output json audit verify > "$STATE/audit-verify.json"
"$BIN/kms-cli" --identity "$KMS_PKI/auditor-1" audit export > "$STATE/audit.jsonl"
if grep -q "synthea-sample" "$STATE/audit.jsonl"; then echo "a context value is in clear in the audit trail"; exit 1; fi

python3 - "$STATE" <<'PY'
import json, sys
state = sys.argv[1]
audit = json.load(open(f"{state}/audit-verify.json"))
records = [json.loads(l) for l in open(f"{state}/audit.jsonl")]
denied = sum(1 for r in records if r["outcome"] == "denied")
enc = json.load(open(f"{state}/encrypt.json"))
dec = json.load(open(f"{state}/decrypt.json"))
print()
print("summary")
print(f"  files                 {enc['files']} encrypted, {dec['files']} decrypted, all byte-identical")
print(f"  bytes                 {enc['bytes']:,}")
print(f"  encrypt throughput    {enc['megabytes_per_second']:.1f} MB/s ({enc['seconds']:.3f} s)")
print(f"  decrypt throughput    {dec['megabytes_per_second']:.1f} MB/s ({dec['seconds']:.3f} s)")
print(f"  transport             mutual TLS 1.3; officer-1 created the key, app-1 encrypted and decrypted")
print(f"  KMS calls             {enc['kms_calls']} to encrypt (GenerateDataKey), {dec['kms_calls']} to decrypt (Decrypt)")
print("                        (data-key caching: one call per batch, not one per file)")
print(f"  audit trail           {audit['records_checked']} records, {audit['checkpoints_checked']} checkpoints, intact={audit['intact']}; {denied} denied requests recorded")
PY
echo
echo "server log: $STATE/server.log; outputs: $STATE/encrypted, $STATE/decrypted"
