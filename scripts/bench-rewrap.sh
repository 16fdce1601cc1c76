#!/usr/bin/env bash
# Rewrap throughput: encrypt COPIES copies of a Synthea folder (default ../shared/data/synthea,
# 20 copies), rotate the key, then time `kms-cli rewrap` over all of them. For scale it also
# times, in the same run, a plain copy of the same encrypted files (rewrap copies each body to
# a temporary file, fsyncs and renames, so the copy is its physical floor).
#
# Usage: ./scripts/bench-rewrap.sh [SOURCE_FOLDER] [COPIES]
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE="${1:-../shared/data/synthea}"
COPIES="${2:-20}"
STATE="$PWD/.kms-bench-rewrap"

. scripts/lib.sh
ensure_softhsm
cargo build --release --quiet -p kms-server -p kms-cli
start_kms_server "$STATE"
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; rm -rf "$STATE/plain" "$STATE/enc" "$STATE/copy"' EXIT

mkdir -p "$STATE/plain"
for i in $(seq 1 "$COPIES"); do cp -r "$SOURCE" "$STATE/plain/copy$i"; done
"$BIN/kms-cli" --identity "$KMS_PKI/officer-1" key create --alias bench-rewrap > /dev/null
propose_and_approve grants propose --principal spiffe://hospital.test/app/app-1 --key bench-rewrap \
  --operation generate-data-key,decrypt,re-encrypt > /dev/null
"$BIN/kms-cli" --output json encrypt --key bench-rewrap --context bench=rewrap \
  --in "$STATE/plain" --out "$STATE/enc" > "$STATE/encrypt.json"
"$BIN/kms-cli" --identity "$KMS_PKI/officer-1" key rotate bench-rewrap > /dev/null
sync
copy_seconds=$(python3 -c '
import shutil, subprocess, sys, time
t = time.monotonic()
shutil.copytree(sys.argv[1], sys.argv[2])
subprocess.run(["sync"], check=True)
print(time.monotonic() - t)' "$STATE/enc" "$STATE/copy")
"$BIN/kms-cli" --output json rewrap "$STATE/enc" > "$STATE/rewrap.json"
bytes=$(du -sb "$STATE/enc" | cut -f1)

python3 - "$STATE/rewrap.json" "$bytes" "$copy_seconds" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
size, copy_s = int(sys.argv[2]), float(sys.argv[3])
s = r["seconds"]
print("rewrap benchmark")
print(f"  files                {r['files']} ({size/1e6:.1f} MB), rewrapped {r['rewrapped']}, failed {r['failed']}")
print(f"  versions             before {r['versions_before']}, after {r['versions_after']}")
print(f"  kms-cli rewrap       {s:.3f} s = {r['files']/s:.0f} files/s, {size/1e6/s:.1f} MB/s, {r['kms_calls']} KMS calls")
print(f"  plain cp -r + sync   {copy_s:.3f} s = {size/1e6/copy_s:.1f} MB/s (floor for rewriting every file)")
print(f"  rewrap / copy time   {s/copy_s:.2f}")
PY
