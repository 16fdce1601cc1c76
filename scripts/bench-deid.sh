#!/usr/bin/env bash
# Whole-export de-identification throughput: `kms-cli deid` with the built-in Synthea CSV
# Safe Harbor profile (domain key from a real server on a fresh SoftHSM2 token), with one
# worker thread and with one per core, side by side on the same files with a Python pipeline
# of the kind a research team writes today (csv + hmac + the `ff3` package from PyPI, see
# bench/python_pipeline.py) and with a plain copy of the files (the I/O floor). Median of
# ROUNDS rounds each; prints one table. Loopback only; stops the server at the end.
#
# Usage: ./scripts/bench-deid.sh [DATA_FOLDER] [ROUNDS]   (default: ../shared/data/synthea/csv 5)
set -euo pipefail
cd "$(dirname "$0")/.."
INPUT="$(cd "${1:-../shared/data/synthea/csv}" && pwd)"
ROUNDS="${2:-5}"
STATE="$PWD/.kms-bench-deid"

. scripts/lib.sh
ensure_softhsm
ensure_python_example
"$KMS_PYTHON" -m pip install -q --disable-pip-version-check ff3==1.0.2

echo "==> building (release)"
cargo build --release --quiet -p kms-server -p kms-cli
BIN="$PWD/target/release"
start_kms_server "$STATE"
"$BIN/kms-cli" --identity "$KMS_PKI/officer-1" key create --alias research > /dev/null
"$BIN/kms-cli" --identity "$KMS_PKI/officer-1" domain create bench --key research > /dev/null
propose_and_approve grants propose --principal spiffe://hospital.test/tokenizer/tokenizer-1 --key research \
  --operation domain-key --context-equals kms:domain=bench > /dev/null

echo "==> $ROUNDS rounds each on $INPUT ($(du -sh "$INPUT" | cut -f1))"
for round in $(seq 1 "$ROUNDS"); do
  for threads in 1 "$(nproc)"; do
    start=$(date +%s.%N)
    "$BIN/kms-cli" --identity "$KMS_PKI/tokenizer-1" --output json deid --policy hipaa-safe-harbor-synthea-csv \
      --domain bench --in "$INPUT" --out "$STATE/out-$threads" --threads "$threads" --force --quiet \
      > "$STATE/deid-$threads-$round.json"
    end=$(date +%s.%N)
    echo "$start $end" > "$STATE/wall-$threads-$round.txt"
  done
  "$KMS_PYTHON" bench/python_pipeline.py "$INPUT" "$STATE/out-python" > "$STATE/python-$round.json"
  rm -rf "$STATE/out-copy"
  start=$(date +%s.%N); cp -r "$INPUT" "$STATE/out-copy"; sync "$STATE/out-copy"; end=$(date +%s.%N)
  echo "$start $end" > "$STATE/copy-$round.txt"
done

python3 - "$STATE" "$ROUNDS" "$INPUT" "$(nproc)" <<'PY'
import json, pathlib, statistics, sys
state, rounds, data, cores = pathlib.Path(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]), sys.argv[4]
size = sum(p.stat().st_size for p in data.glob("*.csv"))
def wall(name):
    a, b = map(float, (state / name).read_text().split())
    return b - a
rows = []
for threads in ("1", cores):
    engine = statistics.median(json.loads((state / f"deid-{threads}-{r}.json").read_text())["mb_per_s"] for r in range(1, rounds + 1))
    whole = statistics.median(size / wall(f"wall-{threads}-{r}.txt") / 1e6 for r in range(1, rounds + 1))
    rows.append((f"kms-cli deid, {threads} thread(s)", engine, whole))
python = statistics.median(json.loads((state / f"python-{r}.json").read_text())["mb_per_s"] for r in range(1, rounds + 1))
rows.append(("Python csv+hmac+ff3, 1 thread", python, None))
copy = statistics.median(size / wall(f"copy-{r}.txt") / 1e6 for r in range(1, rounds + 1))
records = json.loads((state / f"deid-1-1.json").read_text())["report"]["records"]
print()
print(f"{size/1e6:.1f} MB, {records:,} records, median of {rounds} rounds, {cores} cores")
print(f"{'':36} {'MB/s':>8} {'whole command':>14} {'vs Python':>10} {'vs copy':>8}")
for label, mbs, whole in rows:
    w = f"{whole:.1f}" if whole else "-"
    print(f"{label:36} {mbs:8.1f} {w:>14} {mbs/python:9.2f}x {mbs/copy:7.2f}x")
print(f"{'cp -r + sync (I/O floor)':36} {copy:8.1f}")
PY
