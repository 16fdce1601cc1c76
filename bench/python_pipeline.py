"""The baseline for the de-identification benchmark: what a research team would write today
in Python for a Synthea CSV export — the csv module, hmac/hashlib for keyed pseudonyms of ids
and names, the `ff3` package (FF3-1, the FPE most Python teams reach for) for SSNs, a per-patient
date shift from the patient's pseudonym, ZIP to 3 digits, coordinates dropped.

It is not our policy and has none of our checks (no unknown-column detection, no reject file,
no atomic output): it is the cheap end of the comparison.

    python python_pipeline.py IN_DIR OUT_DIR [REPEAT]

Prints one JSON line: {"bytes": N, "seconds": S, "mb_per_s": X, "records": R}.
"""

import csv
import datetime
import hashlib
import hmac
import json
import os
import pathlib
import sys
import time

from ff3 import FF3Cipher

KEY = bytes(range(32))
FF3_KEY = "2DE79D232DF5585D68CE47882AE256D6"
FF3_TWEAK = "CBD09280979564"

ID_COLUMNS = {"id", "patient", "encounter", "provider", "organization", "payer", "payer_id"}
NAME_COLUMNS = {"first", "last", "maiden", "prefix", "suffix", "address", "name", "birthplace"}
DROP_COLUMNS = {"lat", "lon", "drivers", "passport"}
DATE_COLUMNS = {"birthdate", "deathdate", "start", "stop", "date"}


def pseudonym(value):
    return hmac.new(KEY, value.strip().casefold().encode(), hashlib.sha256).hexdigest()[:32]


def shift_days(patient):
    digest = hmac.new(KEY, b"shift" + patient.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:4], "big") % 731 - 365


def shift(value, days):
    if not value:
        return value
    if "T" in value:
        moment = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
        return (moment + datetime.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")
    day = datetime.date.fromisoformat(value)
    return (day + datetime.timedelta(days=days)).isoformat()


def run_file(path, out_path, ff3):
    records = 0
    with open(path, newline="", encoding="utf-8") as src, open(
        out_path, "w", newline="", encoding="utf-8"
    ) as dst:
        reader = csv.reader(src)
        header = next(reader)
        lower = [h.lower() for h in header]
        keep = [i for i, h in enumerate(lower) if h not in DROP_COLUMNS]
        writer = csv.writer(dst)
        writer.writerow([header[i] for i in keep])
        patient_col = lower.index("patient") if "patient" in lower else (
            lower.index("id") if path.name == "patients.csv" else None
        )
        for row in reader:
            records += 1
            days = shift_days(row[patient_col]) if patient_col is not None else 0
            out = []
            for i in keep:
                name, value = lower[i], row[i]
                if not value:
                    out.append(value)
                elif name in ID_COLUMNS or name in NAME_COLUMNS:
                    out.append(pseudonym(value))
                elif name == "ssn":
                    digits = value.replace("-", "")
                    enc = ff3.encrypt(digits)
                    out.append(f"{enc[:3]}-{enc[3:5]}-{enc[5:]}")
                elif name in DATE_COLUMNS:
                    out.append(shift(value, days))
                elif name == "zip":
                    out.append(value[:3])
                else:
                    out.append(value)
            writer.writerow(out)
    return records


def main():
    src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    repeat = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    dst.mkdir(parents=True, exist_ok=True)
    ff3 = FF3Cipher(FF3_KEY, FF3_TWEAK)
    files = sorted(src.glob("*.csv"))
    total_bytes = sum(f.stat().st_size for f in files) * repeat
    records = 0
    started = time.perf_counter()
    for _ in range(repeat):
        for f in files:
            records += run_file(f, dst / f.name, ff3)
    seconds = time.perf_counter() - started
    print(json.dumps({"bytes": total_bytes, "seconds": round(seconds, 3),
                      "mb_per_s": round(total_bytes / seconds / 1e6, 2), "records": records}))


if __name__ == "__main__":
    main()
