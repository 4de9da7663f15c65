"""AlpacaEval-style prompts for the CPU demo: held-out LIMA conversations, with LIMA's human answers as references.

    python scripts/demo_prompts.py OUT.json [--skip 200] [--n 16] [data=lima] [data.path=FILE]

LIMA comes through the same `data=lima` loader a run uses (downloaded at the paper's pinned commit, sha256-checked,
cached), or from `data.path` when given. The demo trains on LIMA's first `--skip` examples, so the prompts come
after them: first user turn as the instruction, first assistant turn as the reference output, in alpaca_eval's
record format.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from im_repro.run import load_data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--skip", type=int, default=200)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("overrides", nargs="*", help="Hydra overrides choosing the data, default data=lima")
    args = p.parse_intermixed_args(argv)
    examples = load_data(["data=lima", *args.overrides])
    rows = []
    for example in examples[args.skip:]:
        messages = example["messages"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        if len(user) < 600:  # short prompts: a CPU judge reads instruction and both answers at once
            rows.append({"instruction": user.strip(), "output": answer.strip(), "generator": "lima_human",
                         "dataset": "lima_heldout"})
        if len(rows) == args.n:
            break
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"{args.out}: {len(rows)} held-out prompts after the first {args.skip}")


if __name__ == "__main__":
    main()
