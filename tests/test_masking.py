"""Golden token-level tests of the loss masks on three real tokenizers, plus property-based invariants."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from im_repro.masking import IGNORE_INDEX, encode, encode_batch, encode_full
from im_repro.templates import render

SINGLE = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
SYSTEM = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
MULTI = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]
EMPTY_USER = [{"role": "user", "content": ""}, {"role": "assistant", "content": "  Ok  "}]

# Hand-checked: the supervised tokens (positions >= 1) as the tokenizer spells them. `E` = the tokenizer's EOS.
GOLDEN = {
    ("single", "it"): ["Blue", ".", "E"],
    ("single", "im"): ["Name", "_a", "_colour", ".", "Blue", ".", "E"],
    ("system", "it"): ["4", "E"],
    ("system", "im"): ["Be", "_ter", "se", ".", "2", "+", "2", "?", "4", "E"],
    ("multi", "it"): ["Hello", "!", "E", "C", "iao", "E"],
    ("multi", "im"): ["Hi", "Hello", "!", "E", "By", "e", "C", "iao", "E"],
    ("empty", "it"): ["Ok", "E"],
    ("empty", "im"): ["Ok", "E"],
}
CASES = {"single": SINGLE, "system": SYSTEM, "multi": MULTI, "empty": EMPTY_USER}
SPACE = {"llama2": "▁", "gpt2": "Ġ", "smollm2": "Ġ"}


def supervised_tokens(tokenizer, enc: dict) -> list[str]:
    return [
        tokenizer.convert_ids_to_tokens(i)
        for k, (i, label) in enumerate(zip(enc["input_ids"], enc["labels"]))
        if k > 0 and label != IGNORE_INDEX
    ]


@pytest.mark.parametrize("name", ["llama2", "gpt2", "smollm2"])
@pytest.mark.parametrize("case,mode", sorted(GOLDEN))
def test_golden_supervised_tokens(request, name, case, mode):
    tok = request.getfixturevalue(name)
    expected = [tok.eos_token if t == "E" else t.replace("_", SPACE[name]) for t in GOLDEN[case, mode]]
    assert supervised_tokens(tok, encode(CASES[case], tok, mask=mode)) == expected


def test_llama2_ids_are_the_papers(llama2):
    """PAPER.md §5.1 lists these ids, checked with an independent port of the Llama-2 vocabulary."""
    enc = encode(SINGLE, llama2, mask="it")
    assert enc["input_ids"][:7] == [1, 529, 29989, 1792, 29989, 29958, 13]  # <s> <|user|>\n
    # The in-context assistant header has no "▁" before "<" (29966, not 529): why the released search fails.
    assert enc["input_ids"][12:19] == [29966, 29989, 465, 22137, 29989, 29958, 13]


def test_input_ids_equal_the_tokenizers_own_encoding(any_tokenizer):
    for messages in CASES.values():
        text = render(messages, any_tokenizer).text
        assert encode(messages, any_tokenizer, mask="im")["input_ids"] == any_tokenizer(text)["input_ids"]


def test_rendering_is_the_papers_tulu_format(llama2):
    assert render(MULTI, llama2).text == (
        "<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\nBye\n<|assistant|>\nCiao</s>"
    )
    assert render(SYSTEM, llama2).text.startswith("<|system|>\nBe terse.\n<|user|>\n2+2?\n")


@pytest.mark.parametrize("mode", ["it", "im"])
def test_truncation_through_a_header(llama2, mode):
    """Cut inside "<|assistant|>\\n": IT has nothing left to learn, IM keeps the instruction."""
    full = encode(SINGLE, llama2, mask=mode)
    enc = encode_full(SINGLE, llama2, mask=mode, max_seq_length=14)
    assert enc.input_ids == full["input_ids"][:14] and enc.truncated
    assert enc.num_supervised == (0 if mode == "it" else 4)


def test_full_mode_supervises_everything(gpt2):
    enc = encode(MULTI, gpt2, mask="full")
    assert enc["labels"] == enc["input_ids"]


def test_weighted_interpolates_between_it_and_im(llama2):
    it, im = encode(MULTI, llama2, mask="it"), encode(MULTI, llama2, mask="im")
    for w, same_as in [(0.0, it), (1.0, im)]:
        enc = encode(MULTI, llama2, mask="weighted", prompt_loss_weight=w)
        supervised = [label if weight > 0 else IGNORE_INDEX for label, weight in zip(enc["labels"], enc["loss_weights"])]
        assert supervised == same_as["labels"]
    enc = encode(MULTI, llama2, mask="weighted", prompt_loss_weight=0.25)
    weights = dict(zip(supervised_tokens(llama2, enc), [w for k, w in enumerate(enc["loss_weights"]) if k and enc["labels"][k] != -100]))
    assert weights["Hi"] == 0.25 and weights["Hello"] == 1.0 and weights["</s>"] == 1.0


def test_bad_settings_fail_clearly(llama2, smollm2):
    with pytest.raises(ValueError, match="prompt_loss_weight"):
        encode(SINGLE, llama2, mask="weighted", prompt_loss_weight=1.5)
    with pytest.raises(ValueError, match="only used with mask=weighted"):
        encode(SINGLE, llama2, mask="im", prompt_loss_weight=0.5)
    with pytest.raises(ValueError, match="unknown mask mode"):
        encode(SINGLE, llama2, mask="lm")
    with pytest.raises(ValueError, match="template=tulu"):
        encode(SINGLE, smollm2, mask="im_released", template="chat_template")


# ----------------------------------------------------------------------------- the released IM mask --------


def test_im_released_trains_on_what_im_does_not(llama2):
    """PAPER.md §5.1: only the leading "<s><|user|>\\n" matches, so every later header and separator is trained on."""
    released, im = encode(MULTI, llama2, mask="im_released"), encode(MULTI, llama2, mask="im")
    assert released["input_ids"] == im["input_ids"]
    assert released["labels"][:7] == [IGNORE_INDEX] * 7
    only_released = [
        llama2.convert_ids_to_tokens(i)
        for i, a, b in zip(released["input_ids"], released["labels"], im["labels"])
        if a != IGNORE_INDEX and b == IGNORE_INDEX
    ]
    header = ["<", "|", "ass", "istant", "|", ">", "<0x0A>"]
    user = ["<", "|", "user", "|", ">", "<0x0A>"]
    assert only_released == ["<0x0A>"] + header + ["<0x0A>"] + user + ["<0x0A>"] + header
    assert not any(a == IGNORE_INDEX and b != IGNORE_INDEX for a, b in zip(released["labels"], im["labels"]))


def test_im_released_with_a_system_message_masks_only_the_system_header(llama2):
    labels = encode(SYSTEM, llama2, mask="im_released")["labels"]
    assert labels[:7] == [IGNORE_INDEX] * 7 and IGNORE_INDEX not in labels[7:]


# ----------------------------------------------------------------------------- chat templates --------------


def test_chat_template_matches_apply_chat_template(smollm2):
    enc = encode_full(MULTI, smollm2, mask="im", template="chat_template")
    assert enc.input_ids == list(smollm2.apply_chat_template(MULTI, tokenize=True)["input_ids"])
    sup = supervised_tokens(smollm2, enc.as_dict())
    assert sup == ["Hi", "Hello", "!", "<|im_end|>", "By", "e", "C", "iao", "<|im_end|>"]  # not the default system prompt


# ----------------------------------------------------------------------------- slow tokenizer fallback -----


def test_slow_sentencepiece_fallback_agrees_with_fast(llama2, llama2_slow):
    assert not llama2_slow.is_fast
    for mode in ("it", "im"):
        slow, fast = encode(SINGLE, llama2_slow, mask=mode), encode(SINGLE, llama2, mask=mode)
        assert slow == fast


def test_slow_legacy_tokenizer_keeps_its_quirk_and_masks_right(llama2_slow):
    """The legacy slow tokenizer puts "▁" after "</s>" (PAPER.md §5.6): it is template, never supervised."""
    enc = encode(MULTI, llama2_slow, mask="im")
    tokens = llama2_slow.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[tokens.index("</s>") + 1] == "▁"
    assert supervised_tokens(llama2_slow, enc) == ["Hi", "Hello", "!", "</s>", "By", "e", "C", "iao", "</s>"]


# ----------------------------------------------------------------------------- properties ------------------

# Contents mix words, punctuation, whitespace, multi-byte characters and template/EOS look-alikes.
content = st.lists(
    st.sampled_from(list("abcXYZ019 .,!?'\"\n\t-_") + ["é", "中", "🙂", "<|user|>", "</s>", "<|assistant|>", "  "]),
    max_size=40,
).map("".join)
conversation = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant"]), content), min_size=1, max_size=6
).map(lambda turns: [{"role": r, "content": c} for r, c in turns])


def _squash(s: str) -> str:
    return "".join(s.split())


def _decode(tokenizer, ids) -> str:
    sp = getattr(tokenizer, "sp_model", None)
    if sp is None:
        return tokenizer.decode(ids)
    # The slow tokenizer's Python decode mishandles byte pieces, and the processor drops control tokens (</s>).
    special, out, run = set(tokenizer.all_special_ids), [], []
    for i in ids:
        if i in special:
            out += [sp.decode(run), tokenizer.convert_ids_to_tokens(i)]
            run = []
        else:
            run.append(i)
    return "".join(out) + sp.decode(run)


def _decoded_runs(tokenizer, ids, labels) -> str:
    """Decode maximal runs of supervised tokens (a run never splits a character's bytes)."""
    out, run = [], []
    for k, (i, label) in enumerate(zip(ids, labels)):
        if k > 0 and label != IGNORE_INDEX:
            run.append(i)
        elif run:
            out.append(_decode(tokenizer, run))
            run = []
    return "".join(out) + (_decode(tokenizer, run) if run else "")


@pytest.fixture(scope="session", params=["llama2", "gpt2", "smollm2", "llama2_slow"])
def tokenizer_incl_slow(request):
    return request.getfixturevalue(request.param)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversation, max_len=st.sampled_from([8, 32, 4096]))
def test_invariants_on_random_conversations(tokenizer_incl_slow, messages, max_len):
    tok = tokenizer_incl_slow
    text = render(messages, tok).text
    expected_ids = tok(text)["input_ids"][:max_len]
    by_mode = {m: encode(messages, tok, mask=m, max_seq_length=max_len) for m in ("it", "im", "full", "im_released")}
    for enc in by_mode.values():
        assert enc["input_ids"] == expected_ids
        assert all(label in (i, IGNORE_INDEX) for i, label in zip(enc["input_ids"], enc["labels"]))
    sup = {m: {k for k, label in enumerate(e["labels"]) if label != IGNORE_INDEX} for m, e in by_mode.items()}
    assert sup["it"] <= sup["im"] <= sup["full"] == set(range(len(expected_ids)))
    if not any("<|" in m["content"] for m in messages):  # the released search also masks look-alikes in content
        assert sup["im"] <= sup["im_released"] | {0}
    if max_len == 4096:  # untruncated: the supervised text is exactly the contents (+ EOS), whitespace aside
        outputs = "".join(m["content"].strip() + tok.eos_token for m in messages if m["role"] == "assistant")
        everything = "".join(
            m["content"].strip() + (tok.eos_token if m["role"] == "assistant" else "") for m in messages
        )
        ids = by_mode["it"]["input_ids"]
        assert _squash(_decoded_runs(tok, ids, by_mode["it"]["labels"])) == _squash(outputs)
        assert _squash(_decoded_runs(tok, ids, by_mode["im"]["labels"])) == _squash(everything)
    for w in (0.0, 0.5, 1.0):
        enc = encode(messages, tok, mask="weighted", prompt_loss_weight=w, max_seq_length=max_len)
        weights = enc["loss_weights"]
        assert set(weights) <= {0.0, w, 1.0}
        assert {k for k, x in enumerate(weights) if x == 1.0} >= sup["it"] - {0}


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(conversation, min_size=1, max_size=5))
def test_batched_path_equals_per_example(any_tokenizer, batch):
    batched = encode_batch(batch, any_tokenizer, mask="im", max_seq_length=64)
    assert [e.as_dict() for e in batched] == [encode(m, any_tokenizer, mask="im", max_seq_length=64) for m in batch]


@pytest.mark.parametrize("name", ["llama2", "llama2_slow", "gpt2"])
def test_characters_spelled_by_several_byte_tokens_stay_whole(request, name):
    """Byte-fallback / byte-level tokens share one character; all of them carry its class."""
    tok = request.getfixturevalue(name)
    messages = [{"role": "user", "content": "🙂"}, {"role": "assistant", "content": "ok 🙂"}]
    for mode, expected in [("it", "ok 🙂"), ("im", "🙂ok 🙂")]:
        enc = encode(messages, tok, mask=mode)
        positions = [k for k, label in enumerate(enc["labels"]) if k and label != IGNORE_INDEX]
        assert _squash(_decoded_runs(tok, enc["input_ids"], enc["labels"])) == _squash(expected + tok.eos_token)
        if mode == "it":  # one contiguous run: no byte token of the emoji left out
            assert positions == list(range(positions[0], len(enc["input_ids"])))
