"""Print one Markdown table comparing the prepared datasets of the runs under a folder (used by `make demo`).

    python scripts/summarize_prepare.py runs/demo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(root: Path) -> None:
    rows = []
    for stats_file in sorted(root.glob("*/prepare/data_stats.json")):
        tok = json.loads(stats_file.read_text())["tokenization"]
        t = tok["tokens"]
        rows.append([
            stats_file.parts[-3], tok["loss"], tok["kept"], tok["dropped_truncated_no_output"],
            tok["dropped_no_supervision"], tok["truncated"], t["total"], t["instruction"], t["output"], t["template"] + t["special"], t["supervised"],
            f"{t['supervised'] / t['total']:.1%}",
        ])
    if not rows:
        sys.exit(f"no prepared runs under {root}")
    head = ["run", "loss", "kept", "dropped (no output left)", "dropped (no loss)", "truncated", "tokens",
            "instruction", "output", "template", "supervised", "supervised share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    table = "\n".join(lines)
    (root / "prepare_summary.md").write_text(table + "\n")
    print(f"Demo, not a reproduction: what each loss mode trains on ({root}/prepare_summary.md)\n\n{table}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
