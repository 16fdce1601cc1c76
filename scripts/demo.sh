#!/usr/bin/env bash
# The main job on real input: start the KMS on a fresh SoftHSM2 token, SQLite database and
# development PKI (everything over mutual TLS, as in production), create a master key as a
# security officer, envelope-encrypt every Synthea sample file as an application, decrypt them
# all, check they are byte-identical, check an officer cannot decrypt, verify the audit trail
# as an auditor; then de-identify the Synthea CSV export and FHIR bundles under the built-in
# HIPAA Safe Harbor profiles as a tokenizer, check no SSN or name of the input survives,
# re-identify one deterministic token as a re-identifier with a purpose, list that disclosure
# as the auditor; print a summary, stop the server.
#
# Usage: ./scripts/demo.sh [DATA_FOLDER]   (default: tests/data/synthea)
# State lives in ./.kms-demo (token, database, PINs, PKI, logs, outputs); it is recreated each run.
set -euo pipefail
cd "$(dirname "$0")/.."
INPUT="${1:-tests/data/synthea}"
STATE="$PWD/.kms-demo"
for part in csv fhir; do
  [ -d "$INPUT/$part" ] || { echo "$INPUT has no $part/ folder: the demo needs a Synthea export with csv/ and fhir/ (like tests/data/synthea)" >&2; exit 2; }
done
[ -f "$INPUT/csv/patients.csv" ] || { echo "$INPUT/csv has no patients.csv" >&2; exit 2; }

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
echo "==> de-identification: master key 'research', domain 'study-demo', grants for tokenizer-1 and reidentifier-1"
"$BIN/kms-cli" --identity "$KMS_PKI/officer-1" key create --alias research --description "demo: tokenization domains" > /dev/null
"$BIN/kms-cli" --identity "$KMS_PKI/officer-1" domain create study-demo --key research > /dev/null
propose_and_approve grants propose --principal spiffe://hospital.test/tokenizer/tokenizer-1 --key research \
  --operation tokenize,domain-key --context-equals kms:domain=study-demo > /dev/null
propose_and_approve grants propose --principal spiffe://hospital.test/reidentifier/reidentifier-1 --key research \
  --operation reidentify --context-equals kms:domain=study-demo > /dev/null
TOKENIZER=(--identity "$KMS_PKI/tokenizer-1")
echo "==> de-identifying $INPUT/csv and $INPUT/fhir (as tokenizer-1, HIPAA Safe Harbor profiles)"
"$BIN/kms-cli" "${TOKENIZER[@]}" --output json deid --policy hipaa-safe-harbor-synthea-csv --domain study-demo \
  --in "$INPUT/csv" --out "$STATE/deid/csv" --quiet > "$STATE/deid-csv.json"
"$BIN/kms-cli" "${TOKENIZER[@]}" --output json deid --policy hipaa-safe-harbor-fhir-r4 --domain study-demo \
  --in "$INPUT/fhir" --out "$STATE/deid/fhir" --quiet > "$STATE/deid-fhir.json"
echo "==> checking that no SSN, given or family name of $INPUT/csv/patients.csv is in the output"
python3 - "$INPUT/csv/patients.csv" "$STATE/deid" <<'PY'
import csv, pathlib, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="", encoding="utf-8")))
secrets = {v.lower() for r in rows for v in (r["SSN"], r["FIRST"], r["LAST"]) if v}
text = "".join(p.read_text(encoding="utf-8").lower() for p in pathlib.Path(sys.argv[2]).rglob("*") if p.is_file())
leaked = [s for s in secrets if s in text]
assert secrets and not leaked, f"{len(leaked)} input identifiers found in the de-identified output"
PY
MRN_TRANSFORM='{"kind":"deterministic","normalize":"mrn"}'
TOKEN="$("$BIN/kms-cli" "${TOKENIZER[@]}" tokenize --domain study-demo --field mrn --transform "$MRN_TRANSFORM" MRN-000123)"
PATIENT="$("$BIN/kms-cli" "${TOKENIZER[@]}" tokenize --domain study-demo --field patient --transform '{"kind":"pseudonym"}' demo-patient-1)"
echo "==> re-identifying one MRN token (as reidentifier-1, purpose safety-signal-follow-up); tokenizer-1 may not"
if "$BIN/kms-cli" "${TOKENIZER[@]}" detokenize --domain study-demo --field mrn --transform "$MRN_TRANSFORM" \
    --purpose curiosity --patient-token "$PATIENT" "$TOKEN" > /dev/null 2>&1; then
  echo "a tokenizer re-identified a token"; exit 1
fi
BACK="$("$BIN/kms-cli" --identity "$KMS_PKI/reidentifier-1" detokenize --domain study-demo --field mrn \
  --transform "$MRN_TRANSFORM" --purpose safety-signal-follow-up --patient-token "$PATIENT" "$TOKEN")"
[ "$BACK" = "mrn000123" ] || { echo "detokenize returned something else"; exit 1; }
"$BIN/kms-cli" --identity "$KMS_PKI/auditor-1" --output json audit disclosures --patient-token "$PATIENT" > "$STATE/disclosures.json"

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
dcsv = json.load(open(f"{state}/deid-csv.json"))
dfhir = json.load(open(f"{state}/deid-fhir.json"))
disclosures = json.load(open(f"{state}/disclosures.json"))
for label, d in (("de-identified CSV", dcsv), ("de-identified FHIR", dfhir)):
    r = d["report"]
    print(f"  {label:<21} {r['records']:,} records, {len(r['files'])} files, {d['mb_per_s']:.1f} MB/s, {r['rejected']} rejected (report {d['report_file']})")
print(f"  values transformed    " + ", ".join(f"{k} {v:,}" for k, v in sorted(dcsv['report']['transforms'].items())))
print(f"  disclosures           {len(disclosures)} about the demo patient: " + "; ".join(f"{d['principal'].rsplit('/', 1)[-1]} {d['outcome']} purpose={d['purpose']}" for d in disclosures))
print(f"  audit trail           {audit['records_checked']} records, {audit['checkpoints_checked']} checkpoints, intact={audit['intact']}; {denied} denied requests recorded")
PY
echo
echo "server log: $STATE/server.log; outputs: $STATE/encrypted, $STATE/decrypted"
