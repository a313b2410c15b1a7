"""Mean and standard deviation over runs of `lenet5 evaluate RUN --stress --json` outputs, as a table.

    python docs/scripts/stress_seeds.py A.json B.json C.json > table.md
"""

from __future__ import annotations

import json
import statistics
import sys


def main(paths: list[str]) -> None:
    runs = [json.loads(open(p).read()) for p in paths]
    sets = [row["set"] for row in runs[0]["digits"]]
    kinds = [row["set"] for row in runs[0]["nondigits"]]

    def cell(values: list[float]) -> str:
        mean = statistics.fmean(values) * 100
        if len(values) < 2:
            return f"{mean:.2f}%"
        return f"{mean:.2f}% ± {statistics.stdev(values) * 100:.2f}"

    print("| figure | " + " | ".join(sets) + " |")
    print("|---|" + "---:|" * len(sets))
    for key, name in (("accuracy", "accuracy"), ("unsure", "marked unsure")):
        values = {s: [next(r for r in run["digits"] if r["set"] == s)[key] for run in runs] for s in sets}
        print(f"| {name} | " + " | ".join(cell(values[s]) for s in sets) + " |")
    low = {s: min(next(r for r in run["digits"] if r["set"] == s)["accuracy"] for run in runs) for s in sets}
    print("| lowest run | " + " | ".join(f"{low[s] * 100:.2f}%" for s in sets) + " |")
    print()
    print("| non-digits marked unsure | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    values = {k: [next(r for r in run["nondigits"] if r["set"] == k)["unsure"] for run in runs] for k in kinds}
    print("| share | " + " | ".join(cell(values[k]) for k in kinds) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
