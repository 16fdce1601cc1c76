#!/usr/bin/env bash
# What durable auditing costs: `kms-bench` (mutual TLS, SQLite, SoftHSM2) at concurrency 64
# with the audit trail off and on, alternating ROUNDS times (default 2: off, on, off, on) so
# that drift of the machine hits both sides, then the median of each side and the ratios.
# Targets: GenerateDataKey and Decrypt throughput with audit >= 0.8x without; p99 added by
# audit <= 2 ms. The audit-off server exists only for this baseline.
#
# Usage: ./scripts/bench-audit.sh [ROUNDS] [SECONDS_PER_PHASE]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-2}"
SECONDS_PER_PHASE="${2:-5}"
. scripts/lib.sh
ensure_softhsm
export KMS_HSM_MODULE="$(softhsm_module)"
cargo build --release --quiet -p kms-server -p softhsm-test
OUT="$(mktemp -d /tmp/kms-bench-audit.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT
for round in $(seq 1 "$ROUNDS"); do
  for mode in off on; do
    echo "==> round $round: audit $mode" >&2
    flag=()
    [ "$mode" = off ] && flag=(--audit-off)
    ./target/release/kms-bench "${flag[@]}" --concurrency 64 --connections 4 --keys 0 \
      --no-rotation --seconds "$SECONDS_PER_PHASE" --warmup 1 --max-total-seconds 300 \
      --json "$OUT/$mode-$round.json" > "$OUT/$mode-$round.md"
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(mode):
    runs = [json.load(open(f"{out}/{mode}-{r}.json")) for r in range(1, rounds + 1)]
    return [run["levels"][0]["rpc"][0] for run in runs]
def med(rpcs, call, field):
    return statistics.median(r[call][field] for r in rpcs)
off, on = load("off"), load("on")
print(f"kms-bench, concurrency 64, 4 connections, mutual TLS 1.3, SQLite, SoftHSM2; median of {rounds} alternating runs each\n")
print("| call | audit off calls/s | audit on calls/s | ratio (target >= 0.8) | p99 off ms | p99 on ms | p99 added ms (target <= 2) | Ping calls/s (same runs, on) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for call, name in (("generate_data_key", "GenerateDataKey"), ("decrypt", "Decrypt")):
    t_off, t_on = med(off, call, "calls_per_sec"), med(on, call, "calls_per_sec")
    p_off, p_on = med(off, call, "p99_us") / 1000, med(on, call, "p99_us") / 1000
    ratio = t_on / t_off
    added = p_on - p_off
    print(f"| {name} | {t_off:.0f} | {t_on:.0f} | {ratio:.2f} {'PASS' if ratio >= 0.8 else 'FAIL'} | "
          f"{p_off:.2f} | {p_on:.2f} | {added:.2f} {'PASS' if added <= 2 else 'FAIL'} | {med(on, 'ping', 'calls_per_sec'):.0f} |")
PY
