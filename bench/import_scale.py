"""Import at scale: does `selfrat import` stream? Writes N rows of instruction + input data and imports them.

    python bench/import_scale.py                  # 1,000,000 rows
    python bench/import_scale.py --rows 100000 --format csv

Each row is a distinct absolute item (instruction, input, response, gold score, a rubric as six columns,
a short meta field), about 700 bytes of JSON. The import runs as its own process (`selfrat import`, as a
user types it) so its peak resident memory is measured alone. Prints one JSON line: rows, format, bytes,
seconds, rows_per_s, peak_rss_mb, and the items the workspace holds afterwards (must equal rows).
The goal: a million rows in under 2 GB (the file is ~700 MB of JSON lines).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUBRIC = {
    "criteria": "Does the response do what the instruction asks of the input, accurately and completely?",
    "score1_description": "It ignores the instruction or the input, or is wrong throughout.",
    "score2_description": "It addresses the task in part, with major errors or omissions.",
    "score3_description": "It does the task with noticeable errors or gaps.",
    "score4_description": "It does the task well, with minor errors.",
    "score5_description": "It does the task fully and accurately.",
}


def write_rows(path: Path, rows: int, fmt: str) -> None:
    def record(i: int) -> dict:
        return {
            "instruction": f"Summarise the passage in one sentence (task {i % 1000}).",
            "input": f"Passage {i}: the committee met on day {i % 365} and approved budget line {i} after debate.",
            "response": f"The committee approved budget line {i} on day {i % 365}.",
            "gold_score": 1 + i % 5, **RUBRIC, "source": f"bench-{i % 7}",
        }

    if fmt == "jsonl":
        with open(path, "w") as f:
            for i in range(rows):
                f.write(json.dumps(record(i)) + "\n")
    else:
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(record(0)))
            w.writeheader()
            for i in range(rows):
                w.writerow(record(i))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    ap.add_argument("--keep", type=Path, help="Work in this directory and keep it (default: a temp dir).")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="selfrat-import-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"rows.{a.format}"
    write_rows(src, a.rows, a.format)
    ws = work / "ws"
    selfrat = Path(sys.executable).with_name("selfrat")
    t0 = time.perf_counter()
    proc = subprocess.run([str(selfrat), "--workspace", str(ws), "import", str(src), "--dataset", "big",
                           "--split", "eval", "--json"], capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"import failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, the largest child
    report = json.loads(proc.stdout)
    print(json.dumps({
        "rows": a.rows, "format": a.format, "bytes": src.stat().st_size, "seconds": round(seconds, 2),
        "rows_per_s": round(a.rows / seconds), "peak_rss_mb": round(peak_kb / 1024, 1),
        "items": report["inserted"], "cpu_count": os.cpu_count(),
    }))  # fmt: skip
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
