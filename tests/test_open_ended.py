"""AlpacaEval and MT-Bench end to end on a handful of prompts: a tiny random model answers, judges grade.

Fake judges give fixed, known verdicts so the aggregation can be checked exactly; one test uses the only real small
chat model available offline (SmolLM2-135M-Instruct) as a local judge, whose verdicts may not parse.
"""

from __future__ import annotations

import json
import math
import socket
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from im_repro.config import AlpacaEvalConfig, JudgeConfig, MTBenchConfig
from im_repro.evaluate import alpaca, mtbench
from im_repro.evaluate.generate import Generator, HFEngine
from im_repro.evaluate.judges import ApiJudge, Judge, JudgeError, JudgeUnavailable, make_judge
from tests.conftest import ARTIFACTS

NO_KEY_ENV = "IM_REPRO_TEST_MISSING_KEY"
INSTRUCTIONS = [f"Instruction {i}: describe a colour in one sentence." for i in range(3)]


@dataclass
class CountingGenerator(Generator):
    prompts_seen: int = 0

    def generate(self, prompts, **kwargs):
        self.prompts_seen += len(prompts)
        return super().generate(prompts, **kwargs)


@pytest.fixture(scope="module")
def tiny(llama2):
    """A 2-layer random Llama with the real Llama-2 tokenizer; a wide init so its answers are not empty."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, vocab_size=32000,
                                  tie_word_embeddings=True, initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config).eval(), llama2


def generator(tiny) -> CountingGenerator:
    model, tokenizer = tiny
    return CountingGenerator(HFEngine(model, tokenizer, batch_size=4), tokenizer)


def write_alpaca_files(tmp_path: Path) -> AlpacaEvalConfig:
    prompts, refs = tmp_path / "prompts.json", tmp_path / "references.json"
    prompts.write_text(json.dumps([{"instruction": x, "dataset": "test"} for x in INSTRUCTIONS]))
    refs.write_text(json.dumps([{"instruction": x, "output": f"REF-{i} The sky is blue.", "generator": "reference",
                                 "dataset": "test"} for i, x in enumerate(INSTRUCTIONS)]))
    return AlpacaEvalConfig(enabled=True, prompts=str(prompts), max_new_tokens=8,
                            reference_outputs={"1.0": str(refs), "2.0": str(refs)})


class AlpacaFakeJudge(Judge):
    """Finds the reference (REF-i) among the two outputs the annotator shows and gives a fixed verdict per i.

    1.0 (ranking): i=0 the model wins, i=1 the reference wins, i=2 an unparseable answer.
    2.0 (P(token naming the first output)): the model wins with probability 0.9, 0.4, and i=2 names neither token.
    """

    def __init__(self):
        super().__init__("fake-alpaca")
        self.calls = 0

    @staticmethod
    def _read(messages, first: str, second: str) -> tuple[int, bool]:
        text = messages[-1]["content"]
        ref = text.index("REF-")
        return int(text[ref + 4]), text.index(first) < ref < text.index(second)

    def complete(self, prompts, max_new_tokens):
        self.calls += len(prompts)
        out = []
        for messages in prompts:
            i, ref_first = self._read(messages, '"model_1"', '"model_2"')
            if i == 2:
                out.append("I cannot decide.")
                continue
            model_first = not ref_first
            first_rank = 1 if (i == 0) == model_first else 2
            out.append(str([{"model": "model_1", "rank": first_rank}, {"model": "model_2", "rank": 3 - first_rank}]))
        return out

    def top_logprobs(self, prompts, k):
        self.calls += len(prompts)
        out = []
        for messages in prompts:
            i, ref_first = self._read(messages, '"m"', '"M"')
            if i == 2:
                out.append([("The", -0.1), ("I", -2.5)])
                continue
            p_model = (0.9, 0.4)[i]
            p_first = 1 - p_model if ref_first else p_model
            out.append([("m", math.log(p_first)), ("M", math.log(1 - p_first)), ("The", -9.0)])
        return out


def test_alpaca_eval_end_to_end_exact_and_resumable(tmp_path, tiny):
    from alpaca_eval import constants

    cfg, gen, judge = write_alpaca_files(tmp_path), generator(tiny), AlpacaFakeJudge()
    out = tmp_path / "alpaca_eval"
    metrics = alpaca.run(cfg, gen, gen.tokenizer, "tulu", out, model_name="tiny", judge=judge)

    outputs = json.loads((out / "model_outputs.json").read_text())
    assert [o["instruction"] for o in outputs] == INSTRUCTIONS
    assert all(set(o) == {"instruction", "output", "generator", "dataset"} and o["generator"] == "tiny"
               for o in outputs)
    avg_length = sum(len(o["output"]) for o in outputs) / 3
    assert metrics == pytest.approx({
        "alpaca_eval_1.0/avg_length": avg_length, "alpaca_eval_1.0/n": 2, "alpaca_eval_1.0/n_unparsed": 1,
        "alpaca_eval_1.0/win_rate": 50.0, "alpaca_eval_1.0/standard_error": 50.0,
        "alpaca_eval_2.0/avg_length": avg_length, "alpaca_eval_2.0/n": 2, "alpaca_eval_2.0/n_unparsed": 1,
        "alpaca_eval_2.0/win_rate": 65.0, "alpaca_eval_2.0/standard_error": 25.0,
    })
    assert judge.calls == 6
    missing = json.loads((out / "metrics.json").read_text())["missing"]
    assert "2.0 only" in missing["alpaca_eval_1.0/lc_win_rate"]
    assert "805" in missing["alpaca_eval_2.0/lc_win_rate"]
    assert len((out / "v1.0" / "judge_completions.jsonl").read_text().splitlines()) == 3

    # The annotator is the official one but for its decoder: same template, parser and decoding options.
    official = Path(constants.EVALUATORS_CONFIG_DIR)
    config = next((out / "v2.0" / "annotators").glob("*/configs.yaml"))
    entry = next(iter(yaml.safe_load(config.read_text()).values()))
    assert "fn_completions" not in entry and entry["fn_completion_parser"] == "logprob_parser"
    assert entry["completions_kwargs"] == {"max_tokens": 1, "logprobs": True, "top_logprobs": 5}
    assert (config.parent / "prompt.txt").read_text() == \
        (official / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt").read_text()

    # A rerun generates and judges nothing new and gives the same numbers.
    seen = gen.prompts_seen
    again = alpaca.run(cfg, gen, gen.tokenizer, "tulu", out, model_name="tiny", judge=judge)
    assert again == pytest.approx(metrics) and judge.calls == 6 and gen.prompts_seen == seen


def test_alpaca_eval_without_api_key_still_generates(tmp_path, tiny, monkeypatch):
    monkeypatch.delenv(NO_KEY_ENV, raising=False)
    cfg = write_alpaca_files(tmp_path)
    cfg.judge = JudgeConfig(kind="openai", api_key_env=NO_KEY_ENV)
    out = tmp_path / "alpaca_eval"
    gen = generator(tiny)
    metrics = alpaca.run(cfg, gen, gen.tokenizer, "tulu", out, model_name="tiny")
    assert gen.prompts_seen == 3 and len(json.loads((out / "model_outputs.json").read_text())) == 3
    assert set(metrics) == {"alpaca_eval_1.0/avg_length", "alpaca_eval_2.0/avg_length"}
    missing = json.loads((out / "metrics.json").read_text())["missing"]
    for version in ("1.0", "2.0"):
        assert NO_KEY_ENV in missing[f"alpaca_eval_{version}/win_rate"]
        assert "judge.kind=local" in missing[f"alpaca_eval_{version}/win_rate"]


def test_alpaca_eval_openai_judge_is_the_papers_annotator(tmp_path, tiny, monkeypatch):
    """kind=openai goes through alpaca_eval's own annotator config and OpenAI decoder (the HTTP call is faked)."""
    from alpaca_eval.decoders import openai as ae_openai

    calls = []

    def fake_helper(args, **kwargs):
        prompts, _ = args
        calls.append(kwargs)
        ranking = "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]"
        return [{"text": ranking, "total_tokens": 1.0} for _ in prompts]

    monkeypatch.setattr(ae_openai, "_openai_completion_helper", fake_helper)
    monkeypatch.setenv(NO_KEY_ENV, "sk-test")
    cfg = write_alpaca_files(tmp_path)
    cfg.versions = ["1.0"]
    cfg.judge = JudgeConfig(kind="openai", api_key_env=NO_KEY_ENV)
    gen = generator(tiny)
    metrics = alpaca.run(cfg, gen, gen.tokenizer, "tulu", tmp_path / "ae", model_name="tiny")
    assert len(calls) == 3
    assert {c["model"] for c in calls} == {"gpt-4"} and all(c["openai_api_keys"] == ["sk-test"] for c in calls)
    assert metrics["alpaca_eval_1.0/n"] == 3 and 0 <= metrics["alpaca_eval_1.0/win_rate"] <= 100
    annotations = json.loads((tmp_path / "ae" / "v1.0" / "annotations_cache.json").read_text())
    assert {a["annotator"] for a in annotations} == {"alpaca_eval_gpt4"}


def test_alpaca_eval_rejects_an_annotator_our_judges_cannot_serve(tmp_path, tiny):
    cfg = write_alpaca_files(tmp_path)
    cfg.versions, cfg.annotators = ["1.0"], {"1.0": "alpaca_eval_gpt4_fn"}  # needs OpenAI function calling
    gen = generator(tiny)
    with pytest.raises(ValueError, match="tool"):
        alpaca.run(cfg, gen, gen.tokenizer, "tulu", tmp_path / "ae", model_name="tiny", judge=AlpacaFakeJudge())
    assert gen.prompts_seen == 0  # refused before any generation


# Judge prompts in FastChat's judge_prompts.jsonl schema (names, fields and placeholders; shortened texts).
JUDGE_PROMPTS = [
    {"name": "single-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
     "prompt_template": "[Instruction]\nRate 1-10 as [[rating]].\n\n[Question]\n{question}\n\n[Answer]\n{answer}",
     "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
     "prompt_template": "[Instruction]\nRate 1-10 as [[rating]].\n\n[Question]\n{question}\n\n[Reference]\n"
                        "{ref_answer_1}\n\n[Answer]\n{answer}",
     "category": "math", "output_format": "[[rating]]"},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Rate the second answer 1-10 as [[rating]].",
     "prompt_template": "### User:\n{question_1}\n### Assistant A:\n{answer_1}\n### User:\n{question_2}\n"
                        "### Assistant A:\n{answer_2}",
     "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1-multi-turn", "type": "single",
     "system_prompt": "Rate the second answer 1-10 as [[rating]] against the reference.",
     "prompt_template": "### Reference:\n{ref_answer_1}\n{ref_answer_2}\n### User:\n{question_1}\n### Assistant A:\n"
                        "{answer_1}\n### User:\n{question_2}\n### Assistant A:\n{answer_2}",
     "category": "math", "output_format": "[[rating]]"},
]
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is the area of a 2 by 3 rectangle?",
                                                       "And its perimeter?"]},
]


def write_mt_bench_files(tmp_path: Path) -> MTBenchConfig:
    q, r, p = tmp_path / "question.jsonl", tmp_path / "gpt-4.jsonl", tmp_path / "judge_prompts.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in QUESTIONS))
    r.write_text(json.dumps({"question_id": 111, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["6", 10]}]})
                 + "\n")
    p.write_text("".join(json.dumps(x) + "\n" for x in JUDGE_PROMPTS))
    return MTBenchConfig(enabled=True, questions=str(q), references=str(r), judge_prompts=str(p), max_new_tokens=8)


class MTFakeJudge(Judge):
    """Writing: [[8]] then "Rating: [6]" (FastChat's fallback pattern); math: [[4.5]] then no rating at all."""

    def __init__(self):
        super().__init__("fake-mt")
        self.seen: list = []

    def complete(self, prompts, max_new_tokens):
        self.seen += prompts
        verdicts = {("single-v1", False): "Fine. [[8]]", ("single-v1", True): "Rating: [6]",
                    ("single-math-v1", False): "[[4.5]]", ("single-math-v1", True): "It depends."}
        out = []
        for user in (m[1]["content"] for m in prompts):
            math_q, turn2 = "[Reference]" in user or "### Reference" in user, "### User" in user
            out.append(verdicts[("single-math-v1" if math_q else "single-v1", turn2)])
        return out


def test_mt_bench_end_to_end_exact_and_resumable(tmp_path, tiny):
    cfg, gen, judge = write_mt_bench_files(tmp_path), generator(tiny), MTFakeJudge()
    out = tmp_path / "mt_bench"
    metrics = mtbench.run(cfg, gen, gen.tokenizer, "tulu", out, model_name="tiny", judge=judge)
    assert metrics == pytest.approx({"mt_bench/n": 3, "mt_bench/n_unparsed": 1, "mt_bench/turn1": (8 + 4.5) / 2,
                                     "mt_bench/turn2": 6.0, "mt_bench/score": (8 + 4.5 + 6) / 3})

    answers = {a["question_id"]: a["choices"][0]["turns"]
               for a in map(json.loads, (out / "model_answer" / "tiny.jsonl").read_text().splitlines())}
    assert set(answers) == {81, 111} and all(len(t) == 2 and all(t) for t in answers.values())
    # Turn 2 was asked after turn 1 and the model's own answer to it.
    turn2 = {r["question_id"]: r for r in map(json.loads, (out / "answers_turn2.jsonl").read_text().splitlines())}
    assert [m["role"] for m in turn2[81]["messages"]] == ["user", "assistant", "user"]
    assert turn2[81]["messages"][1]["content"] == answers[81][0]
    # The math question is graded against the reference, turn 2 with the multi-turn prompt and both answers.
    prompts = {(m[0]["content"], m[1]["content"]) for m in judge.seen}
    math_t2 = next(u for s, u in prompts if "### Reference:\n6\n10" in u)
    assert answers[111][0] in math_t2 and answers[111][1] in math_t2
    records = [json.loads(x) for x in (out / "model_judgment" / "fake-mt_single.jsonl").read_text().splitlines()]
    assert sorted((r["question_id"], r["turn"], r["score"]) for r in records) == \
        [(81, 1, 8.0), (81, 2, 6.0), (111, 1, 4.5), (111, 2, -1)]

    seen, judged = gen.prompts_seen, len(judge.seen)
    assert mtbench.run(cfg, gen, gen.tokenizer, "tulu", out, model_name="tiny", judge=judge) == pytest.approx(metrics)
    assert gen.prompts_seen == seen and len(judge.seen) == judged


def test_mt_bench_without_api_key_still_generates(tmp_path, tiny, monkeypatch):
    monkeypatch.delenv(NO_KEY_ENV, raising=False)
    cfg = write_mt_bench_files(tmp_path)
    cfg.judge = JudgeConfig(kind="openai", api_key_env=NO_KEY_ENV)
    gen = generator(tiny)
    metrics = mtbench.run(cfg, gen, gen.tokenizer, "tulu", tmp_path / "mt", model_name="tiny")
    assert metrics == {} and gen.prompts_seen == 4  # two questions, two turns
    missing = json.loads((tmp_path / "mt" / "metrics.json").read_text())["missing"]
    assert set(missing) == {"mt_bench/score", "mt_bench/turn1", "mt_bench/turn2"}
    assert all(NO_KEY_ENV in why for why in missing.values())
    with pytest.raises(JudgeUnavailable, match=NO_KEY_ENV):
        make_judge(cfg.judge)


@pytest.mark.parametrize("text,rating", [
    ("Rating: [[7]]", 7.0), ("[[8.5]] and later [[2]]", 8.5), ("Rating: [6]", 6.0), ("no rating", None),
    ("[[11]]", None), ("[[0]]", None), ("[[10]]", 10.0),
])
def test_parse_rating_follows_fastchat(text, rating):
    assert mtbench.parse_rating(text) == rating


class FlakyClient:
    """chat.completions.create fails `failures` times with a connection error, then answers."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise openai.APIConnectionError(request=None)
        message = SimpleNamespace(content="Rating: [[9]]")
        return SimpleNamespace(choices=[SimpleNamespace(message=message)])


def closed_port() -> int:
    """A local port nothing listens on: a connection to it is refused at once, without touching the network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_judge_retries_through_the_openai_client_then_fails_with_the_reason(monkeypatch):
    monkeypatch.setenv(NO_KEY_ENV, "sk-test")
    cfg = JudgeConfig(kind="openai", api_key_env=NO_KEY_ENV, base_url=f"http://127.0.0.1:{closed_port()}/v1",
                      max_retries=1, timeout_s=5)
    judge = make_judge(cfg, batch_size=1)
    assert judge.client.max_retries == 1 and judge.client.timeout == 5
    sent = []
    monkeypatch.setattr(judge.client._client, "send", lambda request, **kw: sent.append(request) or
                        (_ for _ in ()).throw(httpx.ConnectError("refused", request=request)))
    with pytest.raises(JudgeError, match="after 1 retries: APIConnectionError"):
        judge.complete([[{"role": "user", "content": "hi"}]], 16)
    assert len(sent) == 2  # the first request and the client's one retry


def test_api_judge_reports_a_malformed_answer():
    class NoLogprobs(FlakyClient):
        def create(self, **kwargs):
            return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content="m"), logprobs=None)])

    with pytest.raises(JudgeError, match="malformed answer"):
        ApiJudge(NoLogprobs(0), "gpt-4", concurrency=1).top_logprobs([[{"role": "user", "content": "hi"}]], 5)


def test_mt_bench_judge_failure_is_reported_and_resumed(tmp_path, tiny):
    cfg, gen = write_mt_bench_files(tmp_path), generator(tiny)
    out = tmp_path / "mt"
    down = ApiJudge(FlakyClient(10**6), "gpt-4", concurrency=1)
    assert mtbench.run(cfg, gen, gen.tokenizer, "tulu", out, model_name="tiny", judge=down) == {}
    missing = json.loads((out / "metrics.json").read_text())["missing"]
    assert "APIConnectionError" in missing["mt_bench/score"] and "rerun to resume" in missing["mt_bench/score"]

    up = ApiJudge(FlakyClient(0), "gpt-4", concurrency=1)
    metrics = mtbench.run(cfg, gen, gen.tokenizer, "tulu", out, model_name="tiny", judge=up)
    assert metrics["mt_bench/score"] == 9.0 and metrics["mt_bench/n"] == 4


@pytest.fixture(scope="module")
def smollm2_judge():
    folder = ARTIFACTS / "models" / "smollm2-135m-instruct"
    if not folder.exists():
        pytest.fail(f"{folder} is missing: run `make setup` (it builds the offline tokenizers and models)")
    cfg = JudgeConfig(kind="local", model=str(folder), max_new_tokens=8)
    return cfg, make_judge(cfg, batch_size=4)


def check_local_judge_metrics(metrics: dict, missing: dict, prefix: str, n_judgments: int, score: str,
                              bounds: tuple[float, float]) -> None:
    """Every judgment is either parsed into the score or counted as unparsed; no parse, no score."""
    n, bad = metrics[f"{prefix}/n"], metrics[f"{prefix}/n_unparsed"]
    assert n + bad == n_judgments
    if n:
        assert bounds[0] <= metrics[f"{prefix}/{score}"] <= bounds[1]
    else:
        assert f"{prefix}/{score}" not in metrics and f"{prefix}/{score}" in missing


def test_local_smollm2_judge_quick(tmp_path, tiny, smollm2_judge):
    """The real local judge on its cheap paths: 2.0's first-token probabilities, MT-Bench with short verdicts."""
    judge_cfg, judge = smollm2_judge
    gen = generator(tiny)
    cfg = write_alpaca_files(tmp_path)
    cfg.versions = ["2.0"]
    metrics = alpaca.run(cfg, gen, gen.tokenizer, "tulu", tmp_path / "ae", model_name="tiny", judge=judge)
    missing = json.loads((tmp_path / "ae" / "metrics.json").read_text())["missing"]
    check_local_judge_metrics(metrics, missing, "alpaca_eval_2.0", 3, "win_rate", (0, 100))
    logged = [json.loads(x) for x in (tmp_path / "ae" / "v2.0" / "judge_completions.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and all(len(x["completion"]["logprobs"]["content"][0]["top_logprobs"]) == 5
                                    for x in logged)

    mt_cfg = write_mt_bench_files(tmp_path)
    mt_cfg.limit, mt_cfg.judge = 1, judge_cfg
    metrics = mtbench.run(mt_cfg, gen, gen.tokenizer, "tulu", tmp_path / "mt", model_name="tiny", judge=judge)
    missing = json.loads((tmp_path / "mt" / "metrics.json").read_text())["missing"]
    check_local_judge_metrics(metrics, missing, "mt_bench", 2, "score", (1, 10))


@pytest.mark.slow
def test_local_smollm2_judge_full(tmp_path, tiny, smollm2_judge):
    """Both AlpacaEval annotators (1.0 asks for a 100-token ranking) and both MT-Bench questions."""
    judge_cfg, judge = smollm2_judge
    gen = generator(tiny)
    metrics = alpaca.run(write_alpaca_files(tmp_path), gen, gen.tokenizer, "tulu", tmp_path / "ae",
                         model_name="tiny", judge=judge)
    missing = json.loads((tmp_path / "ae" / "metrics.json").read_text())["missing"]
    for version in ("1.0", "2.0"):
        check_local_judge_metrics(metrics, missing, f"alpaca_eval_{version}", 3, "win_rate", (0, 100))

    mt_cfg = write_mt_bench_files(tmp_path)
    mt_cfg.judge = judge_cfg
    metrics = mtbench.run(mt_cfg, gen, gen.tokenizer, "tulu", tmp_path / "mt", model_name="tiny", judge=judge)
    missing = json.loads((tmp_path / "mt" / "metrics.json").read_text())["missing"]
    check_local_judge_metrics(metrics, missing, "mt_bench", 4, "score", (1, 10))


def test_alpaca_eval_version_without_its_references_offline_is_missing_and_the_others_are_judged(tmp_path, tiny,
                                                                                                 monkeypatch):
    """make demo offline: 1.0's references (text-davinci-003) are on the Hub only; 2.0's are a local file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cfg, gen = write_alpaca_files(tmp_path), generator(tiny)
    del cfg.reference_outputs["1.0"]
    metrics = alpaca.run(cfg, gen, gen.tokenizer, "tulu", tmp_path / "ae", model_name="tiny", judge=AlpacaFakeJudge())
    assert metrics["alpaca_eval_2.0/win_rate"] == pytest.approx(65.0) and "alpaca_eval_1.0/win_rate" not in metrics
    missing = json.loads((tmp_path / "ae" / "metrics.json").read_text())["missing"]
    assert "could not be fetched" in missing["alpaca_eval_1.0/win_rate"]
    assert "eval.alpaca_eval.reference_outputs.1.0=FILE" in missing["alpaca_eval_1.0/win_rate"]
