"""The overfitting analyses (heldout_loss, memorization stages) on a tiny Llama, and Figure 2's subset selection."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from im_repro import heldout_loss, memorization, prepare, stages, subsets
from im_repro.common import UserError
from im_repro.data import length_stats
from im_repro.masking import encode_full
from im_repro.templates import Span
from im_repro.run import execute
from im_repro.runs import Job
from tests.conftest import compose_with

TRAIN = [
    [("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris.")],
    [("user", "Name three primary colours."), ("assistant", "Red, yellow and blue.")],
    [("user", "Write a haiku about rain."),
     ("assistant", "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky")],
    [("system", "Be terse."), ("user", "2+2?"), ("assistant", "4")],
    [("user", "Hi there"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke"),
     ("assistant", "Why did the chicken cross the road?")],
    [("user", "Explain photosynthesis in one sentence."),
     ("assistant", "Plants turn light, water and carbon dioxide into sugar and oxygen.")],
]
# Held-out rows by source; two repeat a training instruction up to case and whitespace.
SOURCES = ["flan"] * 8 + ["oasst"] * 6 + ["lima"] * 4
DUPLICATES = {2: "  what is the CAPITAL of   France? ", 14: "Name three primary colours."}


def conversation(turns) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def heldout_rows() -> list[dict]:
    return [{"dataset": source, "id": f"h{i}", **conversation([
        ("user", DUPLICATES.get(i, f"Question {i} from {source}: what is {i} plus {i}?")),
        ("assistant", f"The answer is {2 * i}."),
    ])} for i, source in enumerate(SOURCES)]


def config(tmp_path: Path, *overrides: str):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", **conversation(t)} for i, t in enumerate(TRAIN)])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", heldout_rows())
    return compose_with(
        "data=lima", f"data.path={train}", "model=tiny", "train=smoke", "train.max_seq_length=128",
        "+model.arch.initializer_range=0.5",  # far from uniform logits, so a wrong token mask shows in the loss
        f"analysis.heldout.path={heldout}", "analysis.heldout_fraction=1.0",
        "analysis.batch_size=4", "analysis.max_new_tokens=4", *overrides,
    )


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IM_REPRO_CACHE", str(tmp_path / "cache"))


def job(cfg, run_dir: Path, stage: str) -> Job:
    """The job `execute` would hand the stage, begun afresh (for calling a stage with a stand-in generator)."""
    plan = stages.plan(cfg, run_dir, [stage])
    for unit in plan.units[stage]:
        unit.begin(fresh=True)
    return Job(cfg, run_dir, plan.units[stage], plan.model)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def output_ce(model, input_ids: list[int], token_class: list[int]) -> float:
    """By hand: cross-entropy of the tokens of class OUTPUT, each predicted from the tokens before it."""
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0, :-1]
    targets, classes = torch.tensor(input_ids[1:]), torch.tensor(token_class[1:])
    keep = classes == Span.OUTPUT
    return float(F.cross_entropy(logits[keep], targets[keep]))


# ------------------------------------------------------------------------------------------ heldout_loss stage -


@pytest.fixture(scope="module")
def loss_run(tmp_path_factory):
    """An IM run (one optimizer step) scored by the heldout_loss stage: the loss must still be over output tokens
    only."""
    tmp_path = tmp_path_factory.mktemp("loss")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IM_REPRO_CACHE", str(tmp_path / "cache"))
        cfg = config(tmp_path, "method=im", "analysis.loss_limit=5", "train.max_steps=1")
        execute(cfg, tmp_path, ["prepare", "train", "heldout_loss"])
    return cfg, tmp_path


def test_loss_stage_writes_per_example_losses_and_a_summary(loss_run):
    _, run = loss_run
    out = run / "heldout_loss"
    assert (out / "_COMPLETE").exists()
    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert [r["index"] for r in train] == [0, 1, 2, 3, 4] and train[0]["id"] == "t0"  # loss_limit=5 of 6
    assert len(test) == 5 and all(r["n_output_tokens"] > 0 and r["loss"] > 0 for r in train + test)
    assert summary["checkpoint"] == str(run / "train" / "final")
    for split, records in (("train", train), ("test", test)):
        losses = [r["loss"] for r in records]
        assert summary[split]["n"] == 5
        assert summary[split]["mean"] == pytest.approx(np.mean(losses))
        assert summary[split]["median"] == pytest.approx(np.median(losses))
        assert summary[split]["std"] == pytest.approx(np.std(losses))


def test_held_out_duplicates_of_training_instructions_are_removed_and_counted(loss_run):
    _, run = loss_run
    held = json.loads((run / "heldout_loss" / "summary.json").read_text())["heldout"]
    assert (held["examples"], held["sampled"], held["duplicates_of_training_removed"]) == (18, 18, 2)
    assert held["after_deduplication"] == 16 and held["duplicates_first_20"] == ["h2", "h14"]
    assert {r["id"] for r in read_jsonl(run / "heldout_loss" / "test.jsonl")}.isdisjoint({"h2", "h14"})


def test_per_example_loss_is_the_cross_entropy_over_output_tokens_only(loss_run, llama2):
    cfg, run = loss_run
    model = AutoModelForCausalLM.from_pretrained(run / "train" / "final").eval()
    prepared = datasets.load_from_disk(str(run / "prepare" / "dataset"))
    record = read_jsonl(run / "heldout_loss" / "train.jsonl")[4]  # the multi-turn example: two outputs, two instructions
    row = prepared[record["index"]]
    expected = output_ce(model, row["input_ids"], row["token_class"])
    assert record["loss"] == pytest.approx(expected, rel=1e-5)
    assert record["n_output_tokens"] == sum(c == Span.OUTPUT for c in row["token_class"])
    # what IM trained on (instructions too) gives another number: the mask matters at this initialisation
    trained_on = [Span.OUTPUT if label != -100 else Span.TEMPLATE for label in row["labels"]]
    assert abs(output_ce(model, row["input_ids"], trained_on) - expected) > 0.05

    record = read_jsonl(run / "heldout_loss" / "test.jsonl")[0]
    messages = heldout_rows()[record["index"]]["messages"]
    encoded = encode_full(messages, llama2, mask="it", max_seq_length=cfg.train.max_seq_length)
    assert record["loss"] == pytest.approx(output_ce(model, encoded.input_ids, encoded.token_class.tolist()), rel=1e-5)


def test_complete_loss_stage_is_skipped(loss_run, monkeypatch):
    cfg, run = loss_run
    before = (run / "heldout_loss" / "summary.json").stat().st_mtime_ns

    def no_model(*_, **__):
        raise AssertionError("a complete stage must not load the model")

    monkeypatch.setattr("im_repro.model.load_inference", no_model)
    assert execute(cfg, run, ["heldout_loss"]) == {"heldout_loss": "skip"}
    assert (run / "heldout_loss" / "summary.json").stat().st_mtime_ns == before


def test_loss_stage_needs_a_prepared_dataset(tmp_path):
    with pytest.raises(UserError, match="heldout_loss needs the prepare stage's output"):
        execute(config(tmp_path), tmp_path, ["heldout_loss"])


# ------------------------------------------------------------------------------------------ held-out sampling -


def test_first_per_source_takes_the_first_share_of_each_source_in_file_order():
    sources = ["a"] * 10 + ["b"] * 5 + ["c"] * 5
    assert heldout_loss.first_per_source(sources, 0.2) == [0, 1, 10, 15]
    # 0.5 of 3 + 3 + 4 = 5: shares 1, 1, 2 (rounded down), and the remaining 1 goes to the first example (in file
    # order) of a source whose share is full, as in the released reformat_tulu_dataset.py
    mixed = ["a", "b", "a", "c", "b", "c", "c", "a", "b", "c"]
    assert heldout_loss.first_per_source(mixed, 0.5) == [0, 1, 2, 3, 5]


def test_random_sample_is_seeded_and_sized_as_the_released_code():
    examples = [{"messages": [], "dataset": s} for s in SOURCES]
    a = heldout_loss.sample_heldout(examples, 0.5, "random", seed=1)
    assert len(a) == 9 and a == sorted(a) == heldout_loss.sample_heldout(examples, 0.5, "random", seed=1)
    assert a != heldout_loss.sample_heldout(examples, 0.5, "random", seed=2)
    # 6 of 18: flan, oasst and lima's shares 2, 2, 1 (rounded down), the remaining one to flan's next example
    assert heldout_loss.sample_heldout(examples, 1 / 3, "first_per_source", seed=0) == [0, 1, 2, 8, 9, 14]
    with pytest.raises(ValueError, match="heldout_sampling"):
        heldout_loss.sample_heldout(examples, 0.5, "stratified", seed=0)


def test_deduplicate_matches_first_user_messages_up_to_case_and_whitespace():
    training = [conversation(t) for t in TRAIN]
    candidates = [conversation([("system", "x"), ("user", "WRITE a  haiku about rain.\n"), ("assistant", "y")]),
                  conversation([("user", "Write a haiku about snow."), ("assistant", "y")]),
                  conversation([("user", "Hi"), ("assistant", "y"), ("user", "Tell me a joke"), ("assistant", "z")])]
    assert heldout_loss.deduplicate(candidates, training) == ([1, 2], [0])  # only first user messages are compared


# ------------------------------------------------------------------------------------------ memorisation -----


class FakeGenerator:
    """Answers each training instruction with a fixed text: its reference (copy) or something unrelated."""

    def __init__(self, tokenizer, copy: bool):
        self.tokenizer, self.copy, self.prompts = tokenizer, copy, 0
        self.answers = {t[k][1]: t[k + 1][1] for t in TRAIN for k in range(len(t) - 1) if t[k][0] == "user"}

    def generate(self, prompts, **kwargs):
        self.prompts += len(prompts)
        out = []
        for text, _ in prompts:  # the unrelated answer shares no token with any reference, punctuation included
            instruction = next(i for i in self.answers if f"<|user|>\n{i}\n<|assistant|>\n" in text)
            out.append([f" {self.answers[instruction]}" if self.copy else "zebras graze quietly near volcanoes"])
        return out


def test_bleu_of_a_copy_is_100_and_of_unrelated_text_is_low(tmp_path, llama2):
    cfg = config(tmp_path, "method=base")
    memorization.run(job(cfg, tmp_path / "copy", "memorization"), generator=FakeGenerator(llama2, copy=True))
    copy = json.loads((tmp_path / "copy" / "memorization" / "summary.json").read_text())
    assert copy["mean_sentence_bleu"] == pytest.approx(100) and copy["corpus_bleu"] == pytest.approx(100)
    assert copy["n"] == len(TRAIN) and copy["skipped_no_user_assistant_pair"] == 0
    assert copy["sentence_signature"] == "nrefs:1|case:mixed|eff:yes|tok:13a|smooth:exp|version:2.6.0"
    assert copy["corpus_signature"] == "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"

    memorization.run(job(cfg, tmp_path / "other", "memorization"), generator=FakeGenerator(llama2, copy=False))
    other = json.loads((tmp_path / "other" / "memorization" / "summary.json").read_text())
    assert other["mean_sentence_bleu"] < 5 and other["corpus_bleu"] < 5
    scores = read_jsonl(tmp_path / "other" / "memorization" / "scores.jsonl")
    assert [s["id"] for s in scores] == [f"t{i}" for i in range(len(TRAIN))] and all(s["bleu"] < 5 for s in scores)


def test_memorization_asks_the_first_instruction_and_scores_the_first_reply(tmp_path):
    examples = [conversation(t) for t in TRAIN] + [conversation([("user", "No answer")])]
    items, skipped = memorization.memorization_items(examples, limit=None)
    assert skipped == 1 and [i["index"] for i in items] == list(range(len(TRAIN)))
    assert (items[3]["instruction"], items[3]["reference"]) == ("2+2?", "4")  # after a system message
    assert (items[4]["instruction"], items[4]["reference"]) == ("Hi there", "Hello! How can I help?")
    assert len(memorization.memorization_items(examples, limit=2)[0]) == 2


def test_memorization_stage_generates_greedily_resumes_and_skips(tmp_path, llama2):
    cfg = config(tmp_path, "method=base", "analysis.memorization_limit=3")
    execute(cfg, tmp_path, ["memorization"])  # the tiny model as it is (method=base): its random initialisation
    out = tmp_path / "memorization"
    records = read_jsonl(out / "generations.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) == 3 and all(len(r["outputs"]) == 1 for r in records)
    assert summary["n"] == 3 and summary["checkpoint"] == str(tmp_path / "eval" / "random_init")
    assert 0 <= summary["mean_sentence_bleu"] < 100

    # a killed job: the last answer lost, no marker; the same command generates that one answer only
    (out / "_COMPLETE").rename(out / "_STARTED")  # what begin() left, with the key the work was started under
    (out / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    fake = FakeGenerator(llama2, copy=True)
    plan = stages.plan(cfg, tmp_path, ["memorization"])
    memorization.run(Job(cfg, tmp_path, plan.units["memorization"], plan.model), generator=fake)
    assert fake.prompts == 1 and len(read_jsonl(out / "generations.jsonl")) == 3

    execute(cfg, tmp_path, ["memorization"])  # generations complete: only the summary and the marker are written
    assert execute(cfg, tmp_path, ["memorization"]) == {"memorization": "skip"}


# ------------------------------------------------------------------------------------------ Figure 2 subsets -


def synthetic(n: int = 4000, seed: int = 0) -> list[dict]:
    """Examples whose Table 5 lengths are known: instruction I, output O, ratios spread over 1..20."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        out_len = int(rng.integers(2, 40))
        instr_len = max(1, round(rng.uniform(1, 20) * out_len))
        examples.append(conversation([("user", "w " * (instr_len - 1)), ("assistant", "o " * (out_len - 1))]))
    return examples


def test_ratio_controlled_selects_examples_near_the_target():
    examples = synthetic()
    for target in subsets.PAPER_RATIOS:
        chosen = subsets.ratio_controlled(examples, target, n=100, seed=0)
        picked = [examples[i] for i in chosen.indices]
        assert len(set(chosen.indices)) == 100 and chosen.indices == sorted(chosen.indices)
        ratios = subsets.per_example_ratios(picked)
        assert np.all(np.abs(ratios - target) <= 0.1 * target)
        assert chosen.stats["ratio_of_means"] == pytest.approx(length_stats(picked)["instruction_over_output"])
        assert abs(chosen.stats["ratio_of_means"] - target) <= 0.1 * target
        assert chosen.stats["max_abs_deviation"] == pytest.approx(np.abs(ratios - target).max())
    again = subsets.ratio_controlled(examples, 10, n=200, seed=0)
    assert again == subsets.ratio_controlled(examples, 10, n=200, seed=0)


def test_size_controlled_subsets_are_nested_random_draws_from_one_pool():
    examples = synthetic()
    sized = subsets.size_controlled(examples, sizes=(50, 100, 200), target_ratio=10, seed=3)
    assert list(sized) == [50, 100, 200]
    assert set(sized[50].indices) < set(sized[100].indices) < set(sized[200].indices)
    assert sized[200].indices == subsets.ratio_controlled(examples, 10, n=200, seed=3).indices
    assert all(abs(s.stats["ratio_of_means"] - 10) <= 1 for s in sized.values())
    again = subsets.size_controlled(examples, sizes=(50, 100, 200), target_ratio=10, seed=3)
    assert all(again[k].indices == sized[k].indices for k in sized)


def test_subsets_fail_clearly_when_too_few_examples_are_near_the_ratio():
    examples = synthetic(200)  # about 20 near 10, none near 100
    with pytest.raises(subsets.SubsetError, match=r"only \d+ of 200 examples .* within 10% of 100"):
        subsets.ratio_controlled(examples, 100, n=10)
    with pytest.raises(subsets.SubsetError, match="200 are needed"):
        subsets.size_controlled(examples, sizes=(10, 200), target_ratio=10)
    no_output = [conversation([("user", "just a question")])]
    with pytest.raises(subsets.SubsetError, match="only 0 of 1"):
        subsets.ratio_controlled(no_output, 5, n=1)


def test_prepare_keeps_the_configured_subset_and_reports_it(tmp_path):
    # lengths count words + 1 per message (Table 5's unit): ratios 2/4, 3/4, 4/4, ...; closest to 0.9: 4/4 and 3/4
    rows = [conversation([("user", " ".join(["w"] * k)), ("assistant", "a b c")]) for k in range(1, 7)]
    data = write_jsonl(tmp_path / "ratios.jsonl", rows)
    cfg = compose_with("data=tulu_v2_ratio5", f"data.path={data}", "model=tiny", "train=smoke",
                       "data.subset.target_ratio=0.9", "data.subset.n=2", "data.subset.tolerance=0.5")
    execute(cfg, tmp_path / "run", ["prepare"])
    stats = json.loads((tmp_path / "run" / "prepare" / "data_stats.json").read_text())
    assert stats["subset"]["n"] == 2 and stats["subset"]["examples"] == 6 and stats["length_stats"]["size"] == 2
    assert stats["length_stats"]["instruction"] == pytest.approx((3 + 4) / 2)
    with pytest.raises(UserError, match="data.limit and data.subset cannot be combined"):
        execute(compose_with("data=tulu_v2_ratio5", f"data.path={data}", "data.limit=3"), tmp_path / "run2", ["prepare"])


def test_size_subset_configs_name_their_runs_by_size():
    cfg = compose_with("data=tulu_v2_size", "data.subset.size=5000")
    assert (cfg.data.name, cfg.data.subset.kind, cfg.data.source.uri) == ("tulu_v2_n5000", "size",
                                                                          "allenai/tulu-v2-sft-mixture")
