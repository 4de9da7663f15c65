"""Arena-Hard's published scorer on judgment files: the reference tests/test_modern_suite.py compares ours with.

    python scripts/arena_hard_reference.py --official DIR JUDGMENTS.jsonl [--out tests/data/arena_hard_official.json]

DIR is a checkout of lmarena/arena-hard-auto at 196f6b8 (the commit im_repro/evaluate/arena_hard.py follows); it is
copied into a throwaway folder, the judgments are laid out there as the repository lays them out
(data/arena-hard-v2.0/model_judgment/<judge>/<model>.jsonl) and its own `show_result.load_judgments` pools them.
Printed (and written to --out): per category, each question's pooled scores and their mean in percent, the number
the leaderboard's bootstrap centres on (show_result.print_leaderboard prints the mean of 100 unseeded bootstrap
means of exactly these scores). Nothing of the repository's code enters ours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def official_battles(official: Path, judgments: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "arena-hard-auto"
        shutil.copytree(official, copy, ignore=shutil.ignore_patterns(".git", "data"))
        rows = [json.loads(line) for line in judgments.read_text().splitlines() if line.strip()]
        target = copy / "data" / "arena-hard-v2.0" / "model_judgment" / rows[0]["judge"] / f"{rows[0]['model']}.jsonl"
        target.parent.mkdir(parents=True)
        shutil.copy(judgments, target)
        cwd = os.getcwd()
        os.chdir(copy)
        sys.path.insert(0, str(copy))
        try:
            from show_result import load_judgments

            battles = load_judgments([rows[0]["judge"]], "arena-hard-v2.0")
        finally:
            os.chdir(cwd)
            sys.path.remove(str(copy))
    found = {}
    for category, part in battles.groupby("category"):
        scores = part.groupby("uid")["scores"].apply(lambda s: [float(x) for x in s])
        found[category] = {"score": 100.0 * float(part["scores"].astype(float).mean()),
                           "battles": {uid: values for uid, values in scores.items()}}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="a checkout of lmarena/arena-hard-auto")
    parser.add_argument("judgments", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"scorer": "lmarena/arena-hard-auto 196f6b8 show_result.load_judgments", "judgments": args.judgments.name,
              "categories": official_battles(args.official.resolve(), args.judgments.resolve())}
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
