"""Arena-Hard's published scorer on judgment files: the reference tests/test_modern_suite.py compares ours with.

    python scripts/arena_hard_reference.py --official DIR JUDGMENTS.jsonl [ANSWERS.jsonl] [--out tests/data/arena_hard_official.json]

DIR is a checkout of lmarena/arena-hard-auto at 196f6b8 (the commit im_repro/evaluate/arena_hard.py follows); it is
copied into a throwaway folder, the judgments are laid out there as the repository lays them out
(data/arena-hard-v2.0/model_judgment/<judge>/<model>.jsonl) and its own `show_result.load_judgments` pools them.
Printed (and written to --out): per category, each question's pooled scores and their mean in percent, the number
the leaderboard's bootstrap centres on (show_result.print_leaderboard prints the mean of 100 unseeded bootstrap
means of exactly these scores).

With ANSWERS (the run's model_answer/<model>.jsonl), also the style-controlled score: the answers' metadata made
afresh by the repository's `utils/add_markdown_info.py` (tiktoken's gpt-4o encoding: offline, TIKTOKEN_CACHE_DIR
pointing at make setup's artifacts/tiktoken), then `show_result.print_leaderboard_with_style_features` with
`--control-features length markdown`, its 100 unseeded bootstrap fits replaced by one `fit_pairwise_model` on all
battles, and the win rate its `to_winrate_probabilities` computes from that fit. Nothing of the repository's code
enters ours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


BASELINES = ("o3-mini-2025-01-31.jsonl", "gemini-2.0-flash-001.jsonl")


def official_battles(official: Path, judgments: Path, answers: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "arena-hard-auto"
        shutil.copytree(official, copy, ignore=shutil.ignore_patterns(".git", "data"))
        rows = [json.loads(line) for line in judgments.read_text().splitlines() if line.strip()]
        data = copy / "data" / "arena-hard-v2.0"
        target = data / "model_judgment" / rows[0]["judge"] / f"{rows[0]['model']}.jsonl"
        target.parent.mkdir(parents=True)
        shutil.copy(judgments, target)
        cwd = os.getcwd()
        os.chdir(copy)
        sys.path.insert(0, str(copy))
        try:
            import show_result

            battles = show_result.load_judgments([rows[0]["judge"]], "arena-hard-v2.0")
            styled = {} if answers is None else style_controlled(show_result, battles, official, data, answers)
        finally:
            os.chdir(cwd)
            sys.path.remove(str(copy))
            for module in ("show_result", "utils", "utils.judge_utils", "utils.math_utils", "utils.add_markdown_info"):
                sys.modules.pop(module, None)  # the next call imports its own throwaway copy
    found = {}
    for category, part in battles.groupby("category"):
        scores = part.groupby("uid")["scores"].apply(lambda s: [float(x) for x in s])
        found[category] = {"score": 100.0 * float(part["scores"].astype(float).mean()),
                           "battles": {uid: values for uid, values in scores.items()}}
        if category in styled:
            found[category]["style_controlled"] = styled[category]
    return found


def style_controlled(show_result, battles, official: Path, data: Path, answers: Path) -> dict[str, float]:
    """{category: the model's style-controlled win rate in percent}, by the repository's own code (module doc)."""
    import pandas as pd
    import tiktoken
    from utils.add_markdown_info import add_markdown_meta, get_element_counts
    from utils.math_utils import fit_pairwise_model

    (data / "model_answer").mkdir()
    for name in BASELINES:
        shutil.copy(official / "data" / "arena-hard-v2.0" / "model_answer" / name, data / "model_answer" / name)
    frame = pd.read_json(answers, lines=True).drop(columns=["metadata"], errors="ignore")  # made afresh here
    temp = frame[["uid", "messages"]].copy()  # add_markdown_info.py's __main__, on our file
    temp["markdown_meta"] = get_element_counts(frame, column="messages")
    encoder = tiktoken.encoding_for_model("gpt-4o")
    frame["metadata"] = temp.apply(lambda row: add_markdown_meta(row, encoder), axis=1)
    frame.to_json(data / "model_answer" / answers.name, orient="records", lines=True)

    found, win_rates = {}, []
    original = show_result.to_winrate_probabilities, show_result.bootstrap_pairwise_model
    show_result.bootstrap_pairwise_model = lambda features, outcomes, loss_type: (
        fit_pairwise_model(features, outcomes, loss_type)[0][None], None)

    def spy(coefs, models, baseline_model):
        probs = original[0](coefs, models, baseline_model)
        win_rates.append(dict(zip(models, probs[0].tolist())))
        return probs

    show_result.to_winrate_probabilities = spy
    try:
        for category, part in battles.groupby("category"):
            show_result.print_leaderboard_with_style_features(part.reset_index(drop=True), "arena-hard-v2.0", category,
                                                              ["length", "markdown"])
            model = part["model"].iloc[0].split("/")[-1]
            found[category] = 100.0 * win_rates[-1][model]
    finally:
        show_result.to_winrate_probabilities, show_result.bootstrap_pairwise_model = original
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="a checkout of lmarena/arena-hard-auto")
    parser.add_argument("judgments", type=Path)
    parser.add_argument("answers", type=Path, nargs="?", help="the run's model_answer/<model>.jsonl: style control")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"scorer": "lmarena/arena-hard-auto 196f6b8 show_result.load_judgments"
                        + (" and print_leaderboard_with_style_features" if args.answers else ""),
              "judgments": args.judgments.name,
              "categories": official_battles(args.official.resolve(), args.judgments.resolve(),
                                             args.answers and args.answers.resolve())}
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
