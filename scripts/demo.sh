#!/usr/bin/env bash
# The main job on real input: start the KMS on a fresh SoftHSM2 token and SQLite database,
# create a master key, envelope-encrypt every Synthea sample file, decrypt them all, check
# they are byte-identical, print a summary, stop the server.
#
# Usage: ./scripts/demo.sh [DATA_FOLDER]   (default: tests/data/synthea)
# State lives in ./.kms-demo (token, database, PINs, logs, outputs); it is recreated each run.
set -euo pipefail
cd "$(dirname "$0")/.."
INPUT="${1:-tests/data/synthea}"
STATE="$PWD/.kms-demo"

. scripts/lib.sh
ensure_softhsm

echo "==> building (release)"
cargo build --release --quiet -p kms-server -p kms-cli
BIN="$PWD/target/release"

echo "==> fresh SoftHSM2 token and SQLite database in $STATE"
rm -rf "$STATE"
mkdir -p "$STATE/tokens"
chmod 700 "$STATE"
export SOFTHSM2_CONF="$STATE/softhsm2.conf"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
  "$STATE/tokens" > "$SOFTHSM2_CONF"
# Random PINs, readable by the owner only; the server reads the user PIN from its file.
umask 077
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE/user.pin"
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE/so.pin"
softhsm2-util --init-token --free --label kms-demo \
  --so-pin "$(cat "$STATE/so.pin")" --pin "$(cat "$STATE/user.pin")" > /dev/null
umask 022

PORT="$(free_port)"
export KMS_ENDPOINT="http://127.0.0.1:$PORT"
cat > "$STATE/kms.toml" <<TOML
listen = "127.0.0.1:$PORT"

[hsm]
module = "$(softhsm_module)"
token_label = "kms-demo"
pin_file = "$STATE/user.pin"

[store]
url = "sqlite://$STATE/kms.db"
TOML

echo "==> starting kms-server on 127.0.0.1:$PORT"
"$BIN/kms-server" --config "$STATE/kms.toml" > "$STATE/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if "$BIN/kms-cli" ping > /dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server exited:"; cat "$STATE/server.log"; exit 1; fi
  sleep 0.1
done
"$BIN/kms-cli" ping > /dev/null

echo "==> creating master key 'synthea-demo' inside the HSM"
"$BIN/kms-cli" key create --alias synthea-demo --description "demo: Synthea sample" --tag purpose=demo

CONTEXT=(--context dataset=synthea-sample --context purpose=demo)
echo "==> envelope-encrypting every file of $INPUT"
"$BIN/kms-cli" --output json encrypt --key synthea-demo "${CONTEXT[@]}" --in "$INPUT" --out "$STATE/encrypted" > "$STATE/encrypt.json"
echo "==> decrypting them again"
"$BIN/kms-cli" --output json decrypt "${CONTEXT[@]}" --in "$STATE/encrypted" --out "$STATE/decrypted" > "$STATE/decrypt.json"

echo "==> checking byte equality"
diff -r "$INPUT" "$STATE/decrypted" > /dev/null
if grep -rq "Synthea\|Patient" "$STATE/encrypted"; then echo "plaintext found in ciphertext"; exit 1; fi

python3 - "$STATE" <<'PY'
import json, sys
state = sys.argv[1]
enc = json.load(open(f"{state}/encrypt.json"))
dec = json.load(open(f"{state}/decrypt.json"))
print()
print("summary")
print(f"  files                 {enc['files']} encrypted, {dec['files']} decrypted, all byte-identical")
print(f"  bytes                 {enc['bytes']:,}")
print(f"  encrypt throughput    {enc['megabytes_per_second']:.1f} MB/s ({enc['seconds']:.3f} s)")
print(f"  decrypt throughput    {dec['megabytes_per_second']:.1f} MB/s ({dec['seconds']:.3f} s)")
print(f"  KMS calls             {enc['kms_calls']} to encrypt (GenerateDataKey), {dec['kms_calls']} to decrypt (Decrypt)")
print("                        (data-key caching: one call per batch, not one per file)")
PY
echo
echo "server log: $STATE/server.log; outputs: $STATE/encrypted, $STATE/decrypted"
