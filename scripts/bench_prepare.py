"""How fast is masking? Ratios against the bare tokenizer and against the paper's prefix re-tokenization.

    python scripts/bench_prepare.py [--limit N] [--repeats 3] [--tokenizer PATH] [--data PATH]
                                    [--chat-templates qwen3,llama3_1,gemma3] [--chat-only]   (make bench-prepare)

Prints ratios, never asserts on them: wall-clock budgets break on a busy machine, ratios mostly do not.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer  # noqa: E402

from im_repro.masking import IGNORE_INDEX, encode, encode_batch  # noqa: E402
from im_repro.run import lima_overrides, load_data  # noqa: E402
from im_repro.templates import ChatTemplateError, render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 2048
BATCH = 256
CHAIN_LENGTHS = (8, 16, 32)
# Chained messages are cut to this many characters so even 32 messages fit in MAX_LEN: past it the baseline stops
# re-tokenizing (truncation), which would hide the quadratic cost being measured.
CHAIN_CHARS = 200
TULU_V2_SIZE = 326_181  # conf/data/tulu_v2.yaml paper_size
HEADER = f"""\
Each line: best of --repeats runs, after one warm-up, max_seq_length={MAX_LEN}, Tulu template.
  encode <loss>        per-example encode() (render + tokenize with offsets + mask) vs the floor: per-example
                       tokenizer(text) on the same texts, rendered before timing. ratio = ours / floor
  encode_batch <loss>  encode_batch() on batches of {BATCH} vs tokenizer(list_of_texts) on the same batches
  chat_template <name> encode(template=chat_template, loss=im) vs apply_chat_template(tokenize=True) on the same
                       conversations (the tokenizer's own template, artifacts/tokenizers/<name>). ratio = ours / floor
  paper IT <set>       open-instruct encode_with_messages_format (one tokenization per prefix, quadratic in
                       turns) vs our encode(loss=it). ratio = baseline / ours (speedup); label differences listed
"""


def best_times(fns, repeats: int) -> list[float]:
    """Best wall time of each function, their runs interleaved so drift on a shared machine hits all alike."""
    for fn in fns:
        fn()  # warm-up: first calls pay for lazy imports and the tokenizer's caches
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [min(ts) for ts in times]


def concat_messages(messages: list[dict], eos: str) -> str:
    """open-instruct `_concat_messages`: the Tulu format, not stripped."""
    heads = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
    return "".join(
        heads[m["role"]] + m["content"].strip() + (eos if m["role"] == "assistant" else "") + "\n" for m in messages
    )


def paper_it(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """The paper's IT mask: mask [start, end) of each non-assistant message, both found by tokenizing prefixes.

    Lists instead of the original's torch tensors, which only makes the baseline faster.
    """
    eos = tokenizer.eos_token

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, max_length=MAX_LEN, truncation=True)["input_ids"])

    ids = tokenizer(concat_messages(messages, eos).strip(), max_length=MAX_LEN, truncation=True)["input_ids"]
    labels = list(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = 0 if i == 0 else n_tokens(concat_messages(messages[:i], eos))
        so_far = concat_messages(messages[: i + 1], eos)
        if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
            so_far += "<|assistant|>\n"  # the assistant header is masked too
        end = n_tokens(so_far)
        labels[start:end] = [IGNORE_INDEX] * len(labels[start:end])
        if end >= MAX_LEN:
            break
    return ids, labels


def label_differences(conversations: list[list[dict]], tokenizer) -> dict[str, int]:
    """Token counts where the paper's IT labels differ from ours, by kind (expected: only the '\\n' after EOS)."""
    newline = tokenizer.convert_tokens_to_ids("<0x0A>")
    kinds = {"input_ids differ (examples)": 0, "'\\n' after EOS: paper supervises, ours template": 0, "other": 0}
    for messages in conversations:
        ids, theirs = paper_it(messages, tokenizer)
        ours = encode(messages, tokenizer, mask="it", max_seq_length=MAX_LEN)
        kinds["input_ids differ (examples)"] += ours["input_ids"] != ids
        for p, (a, b) in enumerate(zip(theirs, ours["labels"])):
            if a == b:
                continue
            after_eos = ids[p] == newline and p > 0 and ids[p - 1] == tokenizer.eos_token_id and b == IGNORE_INDEX
            kinds["'\\n' after EOS: paper supervises, ours template" if after_eos else "other"] += 1
    return kinds


def chains(singles: list[list[dict]], n_messages: int) -> list[list[dict]]:
    """Consecutive single-turn examples, contents cut to CHAIN_CHARS, joined into conversations of n_messages."""
    cut = [{**m, "content": m["content"][:CHAIN_CHARS]} for conv in singles for m in conv]
    return [cut[i : i + n_messages] for i in range(0, len(cut) - n_messages + 1, n_messages)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a local copy of LIMA (default: data=lima, downloaded and cached)")
    ap.add_argument("--tokenizer", default=str(ROOT / "artifacts/tokenizers/llama2"))
    ap.add_argument("--limit", type=int, default=None, help="use only the first N conversations")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chat-templates", default="qwen3,llama3_1,gemma3",
                    help="comma-separated folders under artifacts/tokenizers/ to time chat_template masking on")
    ap.add_argument("--chat-only", action="store_true", help="time only the chat templates")
    args = ap.parse_args()
    if args.data and not Path(args.data).exists():
        print(f"{args.data} is absent: nothing to measure")
        return

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    convs = [x["messages"] for x in load_data(lima_overrides(args.data))][: args.limit]
    texts = [render(m, tok).text for m in convs]
    batches = [slice(i, i + BATCH) for i in range(0, len(convs), BATCH)]
    print(HEADER + f"{len(convs)} conversations from {args.data or 'LIMA'}, tokenizer {args.tokenizer} (fast={tok.is_fast}),"
          f" repeats {args.repeats}\n")

    rows = []  # (measurement, ours_s, reference_s, ratio, target, met)

    def report(name, ours, ref, ratio, target, met):
        rows.append((name, ours, ref, ratio, target, met))
        print(f"{name:<30} ours {ours:8.3f}s  reference {ref:8.3f}s  ratio {ratio:6.2f}x  (target {target})")

    batch_seconds = {}
    for loss in () if args.chat_only else ("im", "it"):
        ours, floor = best_times(
            [lambda: [encode(m, tok, mask=loss, max_seq_length=MAX_LEN) for m in convs], lambda: [tok(t) for t in texts]],
            args.repeats,
        )
        report(f"encode {loss}", ours, floor, ours / floor, "<= 1.3x", ours / floor <= 1.3)
        ours, floor_batch = best_times(
            [lambda: [encode_batch(convs[b], tok, loss, max_seq_length=MAX_LEN) for b in batches],
             lambda: [tok(texts[b]) for b in batches]],
            args.repeats,
        )
        report(f"encode_batch {loss}", ours, floor_batch, ours / floor_batch, "<= 1.3x", ours / floor_batch <= 1.3)
        batch_seconds[loss] = ours

    for name in filter(None, args.chat_templates.split(",")):
        folder = ROOT / "artifacts" / "tokenizers" / name
        if not folder.exists():
            print(f"chat_template {name}: {folder} is absent (make setup)")
            continue
        chat_tok = AutoTokenizer.from_pretrained(folder)
        usable = []
        for m in convs:
            try:
                render(m, chat_tok, "chat_template")
                usable.append(m)
            except ChatTemplateError:
                pass  # counted below: the template renders these in a way masking refuses
        ours, floor = best_times(
            [lambda: [encode(m, chat_tok, mask="im", template="chat_template", max_seq_length=MAX_LEN) for m in usable],
             lambda: [chat_tok.apply_chat_template(m, tokenize=True) for m in usable]],
            args.repeats,
        )
        report(f"chat_template {name}", ours, floor, ours / floor, "<= 1.5x", ours / floor <= 1.5)
        print(f"{'':<30} {len(usable)} conversations, {len(convs) - len(usable)} refused by masking")

    singles = [m for m in convs if len(m) == 2]
    sets = {} if args.chat_only else {"LIMA 6+ messages": [m for m in convs if len(m) >= 6]}
    sets.update({f"chained {n} msgs, cut": chains(singles, n) for n in CHAIN_LENGTHS if not args.chat_only})
    for name, group in sets.items():
        if not group:
            print(f"paper IT {name}: no conversations (raise --limit)")
            continue
        ours, base = best_times(
            [lambda: [encode(m, tok, mask="it", max_seq_length=MAX_LEN) for m in group],
             lambda: [paper_it(m, tok) for m in group]],
            args.repeats,
        )
        truncated = sum(len(tok(render(m, tok).text)["input_ids"]) > MAX_LEN for m in group)
        report(f"paper IT {name}", ours, base, base / ours, ">= 2x", base / ours >= 2)
        diffs = ", ".join(f"{k}: {v}" for k, v in label_differences(group, tok).items())
        print(f"{'':<30} {len(group)} conversations, {truncated} truncated at {MAX_LEN}; label diffs: {diffs}")

    print(f"\n{'measurement':<30} {'ours (s)':>9} {'floor/baseline (s)':>19} {'ratio':>7}  {'target':<8} met")
    for name, ours, ref, ratio, target, met in rows:
        print(f"{name:<30} {ours:9.3f} {ref:19.3f} {ratio:6.2f}x  {target:<8} {'yes' if met else 'no'}")
    if args.chat_only:
        return
    rate = len(convs) / batch_seconds["im"]
    print(
        f"\nTulu V2 path (not run): `im-repro stages=[prepare] data=tulu_v2` goes through the same encode_batch inside"
        f" datasets.map(batched=True, num_proc=prepare.num_proc); at this run's encode_batch im rate"
        f" ({rate:.0f} conv/s, one process, LIMA-like lengths) its {TULU_V2_SIZE:,} conversations take"
        f" ~{TULU_V2_SIZE / rate / 60:.1f} min per process, divided by num_proc."
    )


if __name__ == "__main__":
    main()
