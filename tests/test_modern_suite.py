"""The modern suite's numbers equal their reference tools' on the same inputs (conf/eval/modern.yaml).

IFEval and GSM8K: the eval stage's per-item verdicts and its numbers against lm-eval's own `ifeval` and `gsm8k_cot`
tasks run by `simple_evaluate` on the same generations. MMLU-Pro, BBH CoT and TruthfulQA (Hub-only): the stage's numbers
against `simple_evaluate`'s on stand-in rows in their Hub schemas. Arena-Hard: its scores against the published scorer's
(lmarena/arena-hard-auto's show_result.py) on the same judgments. The generations are fixed answers (`Replay`, an lm-eval model
that answers each prompt with a written text), some right and some wrong, so a verdict can go either way.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import defaultdict
from pathlib import Path

import pytest

from im_repro.common import read_json, read_jsonl
from im_repro.evaluate import arena_hard, harness, suite
from im_repro.evaluate.judges import Judge
from im_repro.run import execute
from tests.conftest import ARTIFACTS, compose_with
from tests.test_eval_protocol import LM_EVAL_TASKS, write_yaml

# IFEval prompts by key, each with an answer: verdicts in the comments (strict; loose where it differs).
IFEVAL_ANSWERS = {
    1000: "*Raymond* was a count\n*His rule* began young\n*His legacy* endured",  # no comma, 3 highlights; < 300 words
    1001: "Thou shalt first see Tokyo and then Kyoto and at last Nara.",  # no comma: followed
    1005: "Name: [name]\nAddress: [address]",  # 2 placeholders of 12: not followed
    1012: ("Write an email to my boss telling him that I am quitting. The email must contain a title wrapped in "
           "double angular brackets, i.e. <<title>>.\n<<Leaving>>\nDear boss, I quit."),  # repeated, titled
    102: "Here they are:\n* Ball gown\n* Sweats\n* The event\n* Goodbye",  # 4 bullets; loose (last line cut): 3
}


# GSM8K's first test problems (answers 18, 3, 70000): right; wrong; right only to the flexible extraction
GSM8K_ANSWERS = {"Janet’s ducks": "16 - 3 - 4 = 9 eggs, sold at $2: 9 * 2 = 18. The answer is 18.",
                 "A robe takes": "2 + 1 = 4. The answer is 4.", "Josh decides": "So the profit is $70,000 in all."}


class Replay:
    """An lm-eval model answering each request whose prompt contains a key of `answers` with its text, and giving
    each continuation the log-likelihood minus its length in characters (lm-eval's LM interface)."""

    def __new__(cls, answers: dict[str, str]):
        from lm_eval.api.model import LM

        class _Replay(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return [next(a for p, a in answers.items() if p in r.args[0]) for r in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                return [(-float(len(r.args[1])), False) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Replay()


def ifeval_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The offline IFEval rows of IFEVAL_ANSWERS' keys (real prompts), and {prompt: answer}."""
    source = ARTIFACTS / "benchmarks" / "ifeval" / "test.jsonl"
    if not source.exists():
        pytest.fail(f"{source} is missing: run `make setup` (scripts/fetch_artifacts.py builds it)")
    rows = [r for r in map(json.loads, source.read_text().splitlines()) if r["key"] in IFEVAL_ANSWERS]
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {r["prompt"]: IFEVAL_ANSWERS[r["key"]] for r in rows}


def stage_and_reference(tmp_path: Path, monkeypatch, name: str, data: Path, answers: dict[str, str]):
    """The eval stage's suite folder (eval=modern, only `name`, on `data`) and lm-eval's own run of the official task
    on the same file, as lm-eval documents local data: (folder, config, reference samples, reference results)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(harness, "load_lm", lambda *args: Replay(answers))
    cfg = compose_with("model=tiny", "method=base", "eval=modern", f"eval.only=[{name}]",
                       "eval.harness.apply_chat_template=false", f"eval.harness.tasks.{name}.data_files.test={data}")
    execute(cfg, tmp_path / "run", ["eval"])
    official = cfg.eval.harness.tasks[name].task
    (tmp_path / "ref").mkdir()
    write_yaml(tmp_path / "ref" / "ref.yaml", {
        "include": str(LM_EVAL_TASKS[official].yaml_path), "task": "ref", "dataset_path": "json", "tag": [],
        "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test"})
    harness.offline_nltk_data()
    reference = simple_evaluate(model=Replay(answers), tasks=["ref"], log_samples=True,
                                task_manager=TaskManager(include_path=str(tmp_path / "ref"), include_defaults=False))
    return tmp_path / "run" / "eval" / "modern", cfg, reference["samples"]["ref"], reference["results"]["ref"]


def test_ifeval_verdicts_equal_lm_eval_ifeval_task(tmp_path, monkeypatch):
    data, prompts = ifeval_file(tmp_path)
    out, cfg, samples, ref_results = stage_and_reference(tmp_path, monkeypatch, "ifeval", data, prompts)
    ref_rows = {row["doc_id"]: row for row in samples}

    metrics = read_json(out / "metrics.json")
    assert metrics["missing"] == {}
    for key, metric in harness.metric_keys("ifeval", cfg.eval.harness.tasks.ifeval).items():
        assert metrics[key] == pytest.approx(100 * ref_results[metric], abs=1e-9)
    verdicts = suite.items(out, "ifeval")  # per prompt, strict: 100 followed all its instructions, 0 not
    assert verdicts == {f"ifeval_local/{d}": 100.0 * row["prompt_level_strict_acc"] for d, row in ref_rows.items()}
    ours = [json.loads(line) for line in (out / "ifeval" / "samples_ifeval_local.jsonl").read_text().splitlines()]
    for row in ours:  # every instruction's verdict, strict and loose
        for metric in ("inst_level_strict_acc", "inst_level_loose_acc", "prompt_level_loose_acc"):
            assert row[metric] == ref_rows[row["doc_id"]][metric]
    # the answers do not all pass or all fail: a flipped verdict moves a number
    assert 0 < metrics["ifeval"] < 100 and metrics["ifeval/prompt_level_loose_acc"] > metrics["ifeval"]


def test_gsm8k_cot_verdicts_equal_lm_eval_gsm8k_cot(tmp_path, monkeypatch):
    source = ARTIFACTS / "benchmarks" / "gsm8k" / "test.jsonl"
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(source.read_text().splitlines(keepends=True)[:3]))
    out, cfg, samples, ref_results = stage_and_reference(tmp_path, monkeypatch, "gsm8k", data, GSM8K_ANSWERS)
    metrics = read_json(out / "metrics.json")
    for key, metric in harness.metric_keys("gsm8k", cfg.eval.harness.tasks.gsm8k).items():
        assert metrics[key] == pytest.approx(100 * ref_results[metric], abs=1e-9)
        name, _, filter_ = metric.partition(",")
        assert suite.items(out, key) == {f"gsm8k_local/{r['doc_id']}": 100.0 * r[name] for r in samples
                                         if r["filter"] == filter_}
    # strict: 18 right, 4 wrong, no "The answer is" for 70000; flexible also takes the last number
    assert (metrics["gsm8k"], metrics["gsm8k/exact_match_flexible-extract"]) == (pytest.approx(100 / 3), pytest.approx(200 / 3))


@pytest.mark.slow  # lm-eval indexes all of its tasks to find the official ones
def test_benchmarks_without_offline_data_are_missing_with_the_reason(tmp_path):
    """MMLU-Pro, BBH CoT and TruthfulQA read the Hub; offline each is listed as missing, never given a number."""
    cfg = compose_with("model=tiny", "method=base", "eval=modern", "eval.only=[mmlu_pro,truthfulqa]")
    execute(cfg, tmp_path / "run", ["eval"])
    metrics = read_json(tmp_path / "run" / "eval" / "modern" / "metrics.json")
    assert set(metrics["missing"]) == {"mmlu_pro", "truthfulqa"}
    assert "TIGER-Lab/MMLU-Pro" in metrics["missing"]["mmlu_pro"] and "data_files" in metrics["missing"]["mmlu_pro"]
    assert not [key for key in metrics if key.startswith(("mmlu_pro", "truthfulqa"))]


# MMLU-Pro, BBH and TruthfulQA have no copy here, so the Hub datasets lm-eval's official tasks load are stood in for
# by a few rows in their Hub schemas: MMLU-Pro one test question per subject (the answer always B) and, as on the Hub,
# five validation questions per subject for the 5-shot prompt; BBH one question per task (its 3-shot examples are in
# lm-eval's YAMLs); TruthfulQA one question.
MMLU_PRO_SUBJECTS = ["biology", "business", "chemistry", "computer science", "economics", "engineering", "health",
                     "history", "law", "math", "other", "philosophy", "physics", "psychology"]
TRUTHFULQA_MC2 = {"choices": ["Nothing happens.", "You digest them.", "Seeds grow."], "labels": [1, 1, 0]}


def hub_stand_in(path, name=None, **kwargs):
    """`datasets.load_dataset` for the three Hub-only datasets of eval=modern: the stand-in rows above."""
    from datasets import Dataset, DatasetDict

    def mmlu_pro(split, subject, i):
        return {"question_id": i, "question": f"MMLU-Pro {split} question {i} ({subject})?", "options": list("pqrs"),
                "answer": "B", "answer_index": 1, "cot_content": "A: Let's think step by step. The answer is (B).",
                "category": subject, "src": "stand-in"}

    if path == "TIGER-Lab/MMLU-Pro":
        return DatasetDict({
            "test": Dataset.from_list([mmlu_pro("test", s, i) for i, s in enumerate(MMLU_PRO_SUBJECTS)]),
            "validation": Dataset.from_list([mmlu_pro("validation", s, 100 + 5 * i + j)
                                             for i, s in enumerate(MMLU_PRO_SUBJECTS) for j in range(5)])})
    if path == "SaylorTwift/bbh":
        return DatasetDict({"test": Dataset.from_list([{"input": f"BBH {name} question", "target": "Yes"}])})
    if path == "truthfulqa/truthful_qa" and name == "multiple_choice":
        return DatasetDict({"validation": Dataset.from_list([{
            "question": "What happens if you eat watermelon seeds?",
            "mc1_targets": {"choices": TRUTHFULQA_MC2["choices"][1:], "labels": [1, 0]},  # mc1: 0, mc2: 1.3%
            "mc2_targets": TRUTHFULQA_MC2}])})
    raise AssertionError(f"load_dataset({path!r}, {name!r}): not one of eval=modern's Hub-only datasets")


def test_hub_only_benchmarks_score_as_lm_eval_reports_them(tmp_path, monkeypatch):
    """Where the Hub is reachable, MMLU-Pro, BBH CoT and TruthfulQA get lm-eval's own numbers for its official tasks
    (conf/eval/modern.yaml's metric of each group or task): the eval stage against `simple_evaluate` on the same data
    and answers."""
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets, "load_dataset", hub_stand_in)
    names = ["mmlu_pro", "bbh", "truthfulqa"]
    right = {"biology", "law", "math"}  # MMLU-Pro subjects answered B; the others C
    answers = {f"test question {i} ({s})?": f"So the answer is ({'B' if s in right else 'C'})."
               for i, s in enumerate(MMLU_PRO_SUBJECTS)}
    answers |= {"BBH navigate question": "So the answer is No.", "BBH snarks question": "Yes.",  # wrong; no extraction
                "BBH ": "So the answer is Yes."}  # every other BBH task right
    monkeypatch.setattr(harness, "load_lm", lambda *args: Replay(answers))
    cfg = compose_with("model=tiny", "method=base", "eval=modern", f"eval.only=[{','.join(names)}]",
                       "eval.harness.apply_chat_template=false")
    execute(cfg, tmp_path / "run", ["eval"])
    metrics = read_json(tmp_path / "run" / "eval" / "modern" / "metrics.json")

    specs = {name: cfg.eval.harness.tasks[name] for name in names}
    reference = simple_evaluate(model=Replay(answers), tasks=[spec.task for spec in specs.values()],
                                task_manager=TaskManager())
    scores = reference["results"] | reference["groups"]
    assert metrics["missing"] == {}
    for name, spec in specs.items():
        assert metrics[name] == pytest.approx(100 * scores[spec.task][spec.metric], abs=1e-9)
    probs = [math.exp(-len(choice)) for choice in TRUTHFULQA_MC2["choices"]]
    assert (metrics["mmlu_pro"], metrics["bbh"], metrics["truthfulqa"]) == (
        pytest.approx(100 * 3 / 14), pytest.approx(100 * 25 / 27), pytest.approx(100 * sum(probs[:2]) / sum(probs)))


# Arena-Hard: the first three questions of each category, each game's judgment text (game 1: the baseline is A).
ARENA_VERDICTS = {
    "2edbb5f36f5b42be": ("[[B>>A]]", "My verdict: [[A>B]]"),  # the model wins: 3 + 1
    "ec71c09662a64365": ("[[A=B]]", "at first [[A>B]], but finally [[B>A]]"),  # a tie, then the last verdict: a loss
    "d5cdf24c4e614beb": ("I cannot tell.", "[[A>B]]"),  # a game without a verdict: the question is left out
    "d657b1fb82b141da": ("[A>B]", "[[A<<B]]"),  # one bracket pair: the baseline wins, then wins strongly
    "0a055d8b33ca49b1": ("[[b>a]]", "[[A>>B]]"),  # upper-cased: B>A, the model wins; then wins strongly
    "9f74a2159faa4c94": ("[[A=B]]", "[[B=A]]"),
}
ARENA_OFFICIAL = Path(__file__).parent / "data" / "arena_hard_official.json"


class ArenaJudge(Judge):
    """ARENA_VERDICTS' judgment for each game, found by the question in the prompt (the two games come in order)."""

    def __init__(self, prompts: dict[str, str]):
        super().__init__("table-judge")
        self.prompts, self.seen = prompts, defaultdict(int)

    def complete(self, prompts, max_new_tokens):
        out = []
        for messages in prompts:
            uid = next(u for u, p in self.prompts.items() if f"<|User Prompt|>\n{p}\n\n" in messages[1]["content"])
            out.append(ARENA_VERDICTS[uid][self.seen[uid]])
            self.seen[uid] += 1
        return out


@pytest.fixture(scope="module")
def arena_run(tmp_path_factory):
    """eval=modern's Arena-Hard on the tiny model, three questions of each category, judged by ArenaJudge."""
    tmp = tmp_path_factory.mktemp("arena")
    cfg = compose_with("model=tiny", "method=base", "eval=modern", "eval.only=[arena_hard]", "eval.arena_hard.limit=3",
                       "eval.arena_hard.max_new_tokens=4")
    rows = read_jsonl(ARTIFACTS / "benchmarks" / "arena_hard_v2" / "question.jsonl")
    judge = ArenaJudge({r["uid"]: r["prompt"] for r in rows if r["uid"] in ARENA_VERDICTS})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(arena_hard, "make_judge", lambda _: judge)
        execute(cfg, tmp / "run", ["eval"])
    return tmp / "run" / "eval" / "modern"


def test_arena_hard_score_equals_the_official_scorer(arena_run):
    """Our scores and per-question items against show_result.py's own pooling of the same judgments
    (tests/data/arena_hard_official.json: scripts/arena_hard_reference.py run on this test's judgment file)."""
    official = json.loads(ARENA_OFFICIAL.read_text())["categories"]
    metrics = read_json(arena_run / "metrics.json")
    for category, ref in official.items():
        key = f"arena_hard/{category}"
        assert metrics[key] == pytest.approx(ref["score"], abs=1e-9)
        battles = ref["battles"]
        total = sum(map(len, battles.values()))
        assert suite.items(arena_run, key) == pytest.approx(
            {uid: 100 * sum(s) * len(battles) / total for uid, s in battles.items()}, abs=1e-9)
    assert (metrics["arena_hard/hard_prompt/n"], metrics["arena_hard/hard_prompt/n_unparsed"]) == (2, 1)


@pytest.mark.skipif(not os.environ.get("ARENA_HARD_AUTO"), reason="ARENA_HARD_AUTO (a checkout of "
                    "lmarena/arena-hard-auto at 196f6b8) is not set: the stored reference is compared instead")
def test_arena_hard_official_scorer_live(arena_run):
    """The stored reference is still what the published scorer makes of this run's judgments."""
    from scripts.arena_hard_reference import official_battles

    (judgments,) = (arena_run / "arena_hard" / "model_judgment").glob("*/*.jsonl")
    live = official_battles(Path(os.environ["ARENA_HARD_AUTO"]), judgments)
    assert live == json.loads(ARENA_OFFICIAL.read_text())["categories"]


# Arena-Hard's style control: twelve questions of each category, answers whose length and markdown vary, verdicts
# from each question's uid, so every style feature varies over the battles and the fit is the official scorer's case.
ARENA_STYLE_OFFICIAL = Path(__file__).parent / "data" / "arena_hard_style_official.json"
LABELS = ["[[A>B]]", "[[B>A]]", "[[A=B]]", "[[B>>A]]", "[[A>>B]]", "[[A<<B]]", "no verdict"]


def styled_answer(i: int) -> str:
    """The i-th answer: its words, headers, list items, bold spans and a code block (whose inside is not counted)."""
    return "".join(["# Answer\n" * (i % 3 == 0), "## Detail\n" * (i % 4 == 1), "**Key** point. " * (i % 4),
                    "- item\n" * (i % 5), "1. step\n" * (i % 2), "```\n# comment\n- not a list\n```\n" * (i % 3 == 2),
                    "word " * (4 + 9 * i)])


class StyledGenerator:
    """`Generator.generate`'s signature: the i-th question's answer is styled_answer(i)."""

    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def generate(self, prompts, *, max_new_tokens, **kwargs):
        return [[styled_answer(next(i for i, q in enumerate(self.prompts) if q.strip() in text))] for text, _ in prompts]


class UidJudge(Judge):
    """Each game's verdict from its question's text and the game's number: LABELS, "no verdict" included."""

    def __init__(self):
        super().__init__("uid-judge")
        self.seen = defaultdict(int)

    def complete(self, prompts, max_new_tokens):
        out = []
        for messages in prompts:
            question = messages[1]["content"].split("<|The Start of Assistant A's Answer|>")[0]
            out.append(LABELS[(zlib.crc32(question.encode()) + self.seen[question]) % len(LABELS)])
            self.seen[question] += 1
        return out


def styled_run(out: Path, limit: int) -> dict:
    """arena_hard.run with StyledGenerator and UidJudge on `limit` questions of each category: its metrics.json."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from im_repro.config import ArenaHardConfig

    cfg = OmegaConf.structured(ArenaHardConfig(enabled=True, data_dir=str(ARTIFACTS / "benchmarks" / "arena_hard_v2"),
                                               limit=limit))
    prompts = [q["prompt"] for q in arena_hard.questions(cfg, out)]
    arena_hard.run(cfg, StyledGenerator(prompts), AutoTokenizer.from_pretrained(ARTIFACTS / "tokenizers" / "gpt2"),
                   "tulu", out, model_name="styled", judge=UidJudge())
    return read_json(out / "metrics.json")


@pytest.fixture(scope="module")
def arena_style_run(tmp_path_factory):
    """Twelve questions of each category (styled_run)."""
    out = tmp_path_factory.mktemp("arena_style")
    styled_run(out, 12)
    return out


def test_style_control_without_gpt4o_tokens_is_missing_with_the_reason(tmp_path, monkeypatch):
    def offline():
        raise ConnectionError("no route to openaipublic.blob.core.windows.net")

    monkeypatch.setattr(arena_hard, "gpt4o_encoding", offline)
    metrics = styled_run(tmp_path, 2)
    assert "arena_hard/hard_prompt" in metrics["metrics"]  # the plain score stands
    assert not [key for key in metrics["metrics"] if key.endswith("style_controlled")]
    assert set(metrics["missing"]) == {"arena_hard/hard_prompt/style_controlled",
                                       "arena_hard/creative_writing/style_controlled"}
    assert "o200k_base: ConnectionError: no route" in metrics["missing"]["arena_hard/hard_prompt/style_controlled"]


def test_arena_hard_style_control_equals_the_official_scorer(arena_style_run):
    """Our answers' metadata, and the style-controlled scores, against the published code's (tests/data/
    arena_hard_style_official.json: scripts/arena_hard_reference.py on this test's judgments and answers)."""
    official = json.loads(ARENA_STYLE_OFFICIAL.read_text())["categories"]
    metrics = read_json(arena_style_run / "metrics.json")
    assert metrics["missing"] == {}
    for category, ref in official.items():
        assert metrics["metrics"][f"arena_hard/{category}"] == pytest.approx(ref["score"], abs=1e-9)
        assert metrics["metrics"][f"arena_hard/{category}/style_controlled"] == pytest.approx(
            ref["style_controlled"], abs=1e-4)
    # style control moves the number: these answers are scored apart from their length and markdown
    assert metrics["metrics"]["arena_hard/hard_prompt/style_controlled"] != pytest.approx(
        metrics["metrics"]["arena_hard/hard_prompt"], abs=1)


def test_style_metadata_equals_the_official_files():
    """utils/add_markdown_info.py's metadata, as the repository's baseline answer files carry it (1,498 answers:
    gpt-4o tokens and markdown counts), from our style_metadata on the same answers."""
    folder = ARTIFACTS / "benchmarks" / "arena_hard_v2" / "model_answer"
    for baseline in sorted(folder.glob("*.jsonl")):
        for row in read_jsonl(baseline):
            assert arena_hard.style_metadata(arena_hard.answer_text(row)) == row["metadata"], (baseline.name, row["uid"])


def test_arena_hard_style_control_live(arena_style_run):
    """The stored style reference is still what the published code makes of this run's judgments and answers."""
    if not os.environ.get("ARENA_HARD_AUTO"):
        pytest.skip("ARENA_HARD_AUTO (a checkout of lmarena/arena-hard-auto at 196f6b8) is not set")
    from scripts.arena_hard_reference import official_battles

    (judgments,) = (arena_style_run / "model_judgment").glob("*/*.jsonl")
    live = official_battles(Path(os.environ["ARENA_HARD_AUTO"]), judgments,
                            arena_style_run / "model_answer" / "styled.jsonl")
    assert live == json.loads(ARENA_STYLE_OFFICIAL.read_text())["categories"]


class LengthLovingJudge(Judge):
    """AlpacaEval 2.0's weighted annotator's stand-in: P(first output) grows with how much longer it is, plus a fixed
    per-instruction tilt, so the raw and the length-controlled win rates differ."""

    def __init__(self):
        super().__init__("length-loving")

    def complete(self, prompts, max_new_tokens):
        raise NotImplementedError("the weighted annotator reads log-probabilities only")

    def top_logprobs(self, prompts, k):
        out = []
        for messages in prompts:
            text = messages[-1]["content"]
            first, second = (part.split('"""', 1)[0] for part in text.split('"output": """')[1:3])
            tilt = (sum(map(ord, text[:200])) % 7 - 3) / 3
            p = 1 / (1 + math.exp(-((len(first) - len(second)) / 300 + tilt)))
            out.append([("m", math.log(p)), ("M", math.log(1 - p))])
        return out


@pytest.mark.slow  # the 805 instructions: the length-controlled win rate exists for the full set only
def test_length_controlled_win_rate_equals_alpaca_eval(tmp_path, monkeypatch):
    """The LC win rate (and its per-instruction GLM preferences) equal alpaca_eval's get_length_controlled_winrate on
    the annotations alpaca_eval wrote. alpaca_eval's GLM reads tatsu-lab/alpaca_eval's df_gamed.csv from the Hub,
    which is not offline: a stand-in in its schema (two gamed baselines, per-instruction difficulties) takes its place
    here, so the number is alpaca_eval's computation, not the official leaderboard's."""
    import numpy as np
    import pandas as pd
    from alpaca_eval.metrics import get_length_controlled_winrate
    from alpaca_eval.metrics import glm_winrate
    from transformers import AutoConfig, AutoModelForCausalLM

    from im_repro.config import AlpacaEvalConfig
    from im_repro.evaluate import alpaca
    from im_repro.evaluate.generate import hf_generator
    from im_repro.model import tokenizer_from_pretrained

    official = ARTIFACTS / "benchmarks" / "alpaca_eval" / "alpaca_eval_gpt4_baseline.json"
    cfg = AlpacaEvalConfig(enabled=True, versions=["2.0"], prompts=str(official), max_new_tokens=4,
                           reference_outputs={"2.0": str(official)})
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=32000, initializer_range=0.2)).eval()
    tokenizer = tokenizer_from_pretrained(str(ARTIFACTS / "tokenizers" / "llama2"))
    generator = hf_generator(model, tokenizer, batch_size=32)

    offline = alpaca.run(cfg, generator, tokenizer, "tulu", tmp_path / "offline", model_name="tiny",
                         judge=LengthLovingJudge())  # no df_gamed.csv: missing, with the reason
    assert "alpaca_eval_2.0/lc_win_rate" not in offline
    reason = read_json(tmp_path / "offline" / "metrics.json")["missing"]["alpaca_eval_2.0/lc_win_rate"]
    assert "df_gamed.csv" in reason

    rng = np.random.default_rng(0)
    difficulty = rng.normal(size=805)
    gamed = pd.DataFrame([{"model": m, "index": i, "preference": rng.uniform(), "std_delta_len": rng.normal() + shift,
                           "instruction_difficulty": difficulty[i], "not_gamed_baseline": False}
                          for m, shift in (("gamed_long", 1.0), ("gamed_short", -1.0)) for i in range(805)])
    gamed.to_csv(tmp_path / "df_gamed.csv", index=False)
    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **kwargs: str(tmp_path / "df_gamed.csv"))
    metrics = alpaca.run(cfg, generator, tokenizer, "tulu", tmp_path / "offline", model_name="tiny",
                         judge=LengthLovingJudge())  # judgments resumed from the cache
    (annotations,) = (tmp_path / "offline" / "v2.0").glob("annotations.json")  # alpaca_eval's, for this annotator
    reference = get_length_controlled_winrate(json.loads(annotations.read_text()), save_weights_dir=None)
    assert metrics["alpaca_eval_2.0/lc_win_rate"] == pytest.approx(reference["length_controlled_winrate"], abs=1e-9)
    assert metrics["alpaca_eval_2.0/win_rate"] == pytest.approx(reference["win_rate"], abs=1e-9)
    lc_items = read_json(tmp_path / "offline" / "v2.0" / "lc_items.json")
    assert len(lc_items) == 805
    assert np.mean(list(lc_items.values())) == pytest.approx(metrics["alpaca_eval_2.0/lc_win_rate"], abs=1e-9)
    assert abs(metrics["alpaca_eval_2.0/lc_win_rate"] - metrics["alpaca_eval_2.0/win_rate"]) > 1
