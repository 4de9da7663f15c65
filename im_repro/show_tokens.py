"""Show which tokens of one example carry the loss, coloured by class, in the terminal or as an HTML page.

    python -m im_repro.show_tokens data=lima data.path=../shared/data/paper/lima_data.jsonl model=tiny method=im --index 3
    python -m im_repro.show_tokens method=im_released --index 30 --html im_released.html
    python -m im_repro.show_tokens data=lima data.path=... model=gemma3_1b model.path=artifacts/tokenizers/gemma3 \
        model.chat_template=null prepare.template=chat_template method=im      (any template in artifacts/tokenizers/)

Arguments after the options are the same Hydra overrides `im-repro` takes.
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path

from im_repro import data, masking, model
from im_repro.config import plain
from im_repro.masking import CLASS_NAMES, SPECIAL, Encoded
from im_repro.templates import Span

ANSI = {SPECIAL: "35", Span.TEMPLATE: "90", Span.INSTRUCTION: "34", Span.OUTPUT: "32"}
CSS = {SPECIAL: "#a0a", Span.TEMPLATE: "#888", Span.INSTRUCTION: "#1f5fbf", Span.OUTPUT: "#187a2f"}


def token_pieces(encoded: Encoded, tokenizer) -> list[tuple[str, int, bool]]:
    """(text of the token, class, supervised) per token; a label at position 0 is never a target."""
    pieces = []
    for k, (tid, label) in enumerate(zip(encoded.input_ids, encoded.labels)):
        text = tokenizer.convert_ids_to_tokens(tid)
        pieces.append((text, int(encoded.token_class[k]), k > 0 and label != masking.IGNORE_INDEX))
    return pieces


def to_terminal(pieces) -> str:
    legend = "  ".join(f"\x1b[{ANSI[c]}m{n}\x1b[0m" for c, n in CLASS_NAMES.items())
    body = "".join(
        f"\x1b[{ANSI[cls]}{';4;1' if sup else ';2'}m{text}\x1b[0m" + ("\n" if text.endswith(("\n", "<0x0A>", "Ċ")) else "")
        for text, cls, sup in pieces
    )
    return f"{legend}   (underlined bold = supervised, dim = no loss)\n\n{body}\n"


def to_html(pieces, title: str) -> str:
    spans = "".join(
        f'<span class="t c{cls}{" s" if sup else ""}" title="{CLASS_NAMES[cls]}{", loss" if sup else ""}">'
        f"{html.escape(text)}</span>" + ("<br>" if text.endswith(("\n", "<0x0A>", "Ċ")) else "")
        for text, cls, sup in pieces
    )
    styles = "".join(f".c{c}{{color:{col}}}" for c, col in CSS.items())
    return (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>"
        "body{font-family:monospace;max-width:60em;margin:2em auto}.t{border:1px solid #eee;margin:1px}"
        f".s{{background:#fff4b0;font-weight:bold}}{styles}</style><h3>{html.escape(title)}</h3>"
        "<p>" + " ".join(f'<span class="c{c}">{n}</span>' for c, n in CLASS_NAMES.items())
        + ' &middot; <span class="s">highlighted = supervised</span></p><p>' + spans + "</p>"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=int, default=0, help="which example of the dataset")
    parser.add_argument("--html", type=Path, help="also write an HTML page here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=lima method=im")
    args = parser.parse_args(argv)
    from im_repro.run import compose  # registers the schema and resolvers

    cfg = compose(args.overrides)
    cfg.data.limit = args.index + 1
    examples, _ = data.load_examples(cfg.data, cfg.prepare.cache_dir)
    if len(examples) <= args.index:
        raise SystemExit(f"--index {args.index}: the dataset has only {len(examples)} examples")
    tokenizer = model.load_tokenizer(cfg.model)
    mode = plain(cfg.method.mask)
    template = plain(cfg.prepare.template)
    encoded = masking.encode_full(
        examples[args.index]["messages"], tokenizer, mode, template, cfg.train.max_seq_length,
        cfg.method.prompt_loss_weight,
    )
    pieces = token_pieces(encoded, tokenizer)
    title = f"{cfg.data.name}[{args.index}] method={cfg.method.name} template={template} tokenizer={cfg.model.name}"
    print(title, f"- {len(pieces)} tokens, {encoded.num_supervised} supervised")
    print(to_terminal(pieces))
    if args.html:
        args.html.write_text(to_html(pieces, title), encoding="utf-8")
        print(f"wrote {args.html}")


if __name__ == "__main__":
    main()
