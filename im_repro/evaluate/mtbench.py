"""MT-Bench (PAPER.md §1.3): FastChat llm_judge's single-answer grading of two-turn answers.

FastChat's llm_judge is a tree of scripts, not an importable API (and imports anthropic and the pre-1.0 openai API at
module level), so the parts that decide the score are reproduced here from `gen_model_answer.py`,
`gen_judgment.py --mode single`, `common.py` and `show_result.py`:

* answers: turn 2 is asked after turn 1 and the model's own (stripped) answer, in the training chat format;
* judge prompts from FastChat's judge_prompts.jsonl: `single-v1` for turn 1, `single-v1-multi-turn` for turn 2, and
  `single-math-v1(-multi-turn)` with the GPT-4 reference answers for the categories in NEED_REF_CATS; the judge sees
  the prompt's system message and the filled-in user message;
* rating: the first "[[x]]" of the judgment, else the first "[x]"; none gives score -1, left out of every mean;
* scores: the mean of each turn, and overall the mean of all valid judgments of both turns pooled.

Deviations: every category is decoded greedily (FastChat samples writing and roleplay at T=0.7, stem and humanities
at 0.1), and a rating outside 1-10 counts as unparsed (FastChat would average it).

Answers and judgments are appended to JSONL files as they are made; a rerun produces only what is missing.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path

from im_repro.common import download, read_jsonl
from im_repro.config import MTBenchConfig
from im_repro.evaluate.benchmark import Judged
from im_repro.evaluate.generate import ResumableOutputs, chat_prompt, generate_resumable
from im_repro.evaluate.judges import Judge, JudgeError, JudgeUnavailable, file_safe, make_judge

log = logging.getLogger("im_repro")

NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")  # FastChat common.py
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
JUDGE_CHUNK = 8  # judgments between two saves


def fetch(uri: str, cache_dir: Path) -> Path:
    """A local path as is; a URL downloaded once under `cache_dir`/downloads/."""
    if re.match(r"https?://", uri):
        return download(uri, cache_dir)
    if not Path(uri).exists():
        raise FileNotFoundError(f"{uri} does not exist")
    return Path(uri)


def parse_rating(judgment: str) -> float | None:
    """FastChat's rating of a single-answer judgment, or None when there is none (or it is outside 1-10)."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if not match:
        return None
    rating = float(match.group(1))
    return rating if 1 <= rating <= 10 else None


def generate_answers(questions: list[dict], generator, tokenizer, template: str, out_dir: Path,
                     max_new_tokens: int) -> dict[str, list[str]]:
    """question_id -> the model's answers to each turn; turn t is asked after turns < t and their answers."""
    answers: dict[str, list[str]] = {str(q["question_id"]): [] for q in questions}
    for t in range(max(len(q["turns"]) for q in questions)):
        items = []
        for q in questions:
            if len(q["turns"]) <= t:
                continue
            history = []
            for turn, answer in zip(q["turns"][:t], answers[str(q["question_id"])]):
                history += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
            items.append({"question_id": q["question_id"],
                          "messages": history + [{"role": "user", "content": q["turns"][t]}]})
        records = generate_resumable(
            generator, items, out_dir / f"answers_turn{t + 1}.jsonl", key="question_id",
            prompt=lambda item: chat_prompt(item["messages"], tokenizer, template),
            max_new_tokens=max_new_tokens, desc=f"mt_bench turn {t + 1}",
        )
        for record in records:
            answers[str(record["question_id"])].append(record["outputs"][0].strip())  # as FastChat does
    return answers


def judge_jobs(questions: list[dict], answers: dict[str, list[str]], references: dict[str, list],
               judge_prompts: dict[str, dict]) -> list[dict]:
    """One grading request per (question, turn), as gen_judgment.py --mode single builds them."""
    jobs = []
    for q in questions:
        qid = str(q["question_id"])
        ref_based = q["category"] in NEED_REF_CATS
        kwargs = {}
        if ref_based:
            if qid not in references:
                raise ValueError(f"MT-Bench question {qid} ({q['category']}) needs a reference answer; there is none")
            kwargs = {f"ref_answer_{i + 1}": r for i, r in enumerate(references[qid])}
        a = answers[qid]
        turns = [(1, {"question": q["turns"][0], "answer": a[0]})]
        if len(q["turns"]) == 2:
            turns.append((2, {"question_1": q["turns"][0], "question_2": q["turns"][1],
                              "answer_1": a[0], "answer_2": a[1]}))
        for turn, fields in turns:
            name = ("single-math-v1" if ref_based else "single-v1") + ("-multi-turn" if turn == 2 else "")
            prompt = judge_prompts[name]
            user = prompt["prompt_template"].format(**fields, **kwargs)
            jobs.append({"key": f"{qid}-{turn}", "question_id": q["question_id"], "turn": turn, "prompt_name": name,
                         "messages": [{"role": "system", "content": prompt["system_prompt"]},
                                      {"role": "user", "content": user}]})
    return jobs


def grade(jobs: list[dict], judge: Judge, path: Path, *, model_name: str, max_new_tokens: int) -> list[dict]:
    """FastChat-style judgment records for every job, judging only those not yet in `path`."""
    store = ResumableOutputs(path, key="key")
    todo = store.missing(jobs)
    if len(todo) < len(jobs):
        log.info("%s: %d of %d judgments already made, resuming", path.name, len(jobs) - len(todo), len(jobs))
    for start in range(0, len(todo), JUDGE_CHUNK):
        part = todo[start : start + JUDGE_CHUNK]
        judgments = judge.complete([job["messages"] for job in part], max_new_tokens)
        records = []
        for job, judgment in zip(part, judgments):
            rating = parse_rating(judgment)
            records.append({
                "key": job["key"], "question_id": job["question_id"], "model": model_name,
                "judge": [judge.name, job["prompt_name"]], "user_prompt": job["messages"][1]["content"],
                "judgment": judgment, "score": -1 if rating is None else rating, "turn": job["turn"],
                "tstamp": time.time(),
            })
        store.add(records)
    return store.ordered(jobs)


def summarize(records: list[dict]) -> tuple[dict[str, float], dict[str, str]]:
    """show_result.py's means: per turn, and over all valid judgments; judgments without a rating are counted."""
    valid = [r for r in records if r["score"] != -1]
    metrics: dict[str, float] = {"mt_bench/n": len(valid), "mt_bench/n_unparsed": len(records) - len(valid)}
    missing: dict[str, str] = {}
    groups = {"turn1": [r["score"] for r in valid if r["turn"] == 1],
              "turn2": [r["score"] for r in valid if r["turn"] == 2],
              "score": [r["score"] for r in valid]}
    for name, scores in groups.items():
        if scores:
            metrics[f"mt_bench/{name}"] = sum(scores) / len(scores)
        else:
            missing[f"mt_bench/{name}"] = f"no parseable judgment ({len(records) - len(valid)} unparsed)"
    return metrics, missing


def run(cfg: MTBenchConfig, generator, tokenizer, template: str, out_dir: Path, *, model_name: str,
        judge: Judge | None = None) -> dict[str, float]:
    """Generate two-turn answers, grade them, return flat metrics (also in out_dir/metrics.json).

    `judge`: grade with this judge instead of the one `cfg.judge` describes (tests, or one judge shared by suites).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    questions = read_jsonl(fetch(cfg.questions, out_dir))
    questions = questions[: cfg.limit] if cfg.limit is not None else questions

    answers = generate_answers(questions, generator, tokenizer, template, out_dir, cfg.max_new_tokens)
    answer_file = out_dir / "model_answer" / f"{file_safe(model_name)}.jsonl"
    answer_file.parent.mkdir(exist_ok=True)
    answer_file.write_text("".join(json.dumps({
        "question_id": q["question_id"], "model_id": model_name,
        "choices": [{"index": 0, "turns": answers[str(q["question_id"])]}],
    }) + "\n" for q in questions))

    metrics: dict[str, float] = {}
    missing: dict[str, str] = {}
    try:
        judge = judge or make_judge(cfg.judge)
        judge_prompts = {p["name"]: p for p in read_jsonl(fetch(cfg.judge_prompts, out_dir))}
        references = {}
        if any(q["category"] in NEED_REF_CATS for q in questions):
            references = {str(r["question_id"]): r["choices"][0]["turns"]
                          for r in read_jsonl(fetch(cfg.references, out_dir))}
        jobs = judge_jobs(questions, answers, references, judge_prompts)
        path = out_dir / "model_judgment" / f"{file_safe(judge.name)}_single.jsonl"
        records = grade(jobs, judge, path, model_name=model_name, max_new_tokens=cfg.judge.max_new_tokens)
        metrics, missing = summarize(records)
    except (JudgeUnavailable, JudgeError) as e:
        reason = f"not judged: {e}"
        if isinstance(e, JudgeError):
            reason += f" (judgments so far are kept in {out_dir / 'model_judgment'}; rerun to resume)"
        missing = {f"mt_bench/{m}": reason for m in ("score", "turn1", "turn2")}

    (out_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "missing": missing}, indent=2))
    for name, why in missing.items():
        log.warning("%s missing: %s", name, why)
    return metrics


def items(judgment_file: Path, turn: int | None = None) -> dict[str, float]:
    """Per question, its share of the MT-Bench score from a `model_judgment/<judge>_single.jsonl` file: the sum of its
    valid ratings (of `turn`, or both) times (questions) / (valid ratings), so the mean is the pooled score
    `summarize` reports. Questions with no valid rating are left out (metrics.json counts them)."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for r in read_jsonl(judgment_file):
        if r["score"] != -1 and (turn is None or r["turn"] == turn):
            sums[str(r["question_id"])] += r["score"]
            counts[str(r["question_id"])] += 1
    n = sum(counts.values())
    return {q: s * len(sums) / n for q, s in sums.items()}


class MTBench(Judged):
    kind = "mt_bench"

    def entry(self, eval_cfg, name: str) -> dict:
        return {**super().entry(eval_cfg, name), "headlines": ["mt_bench/score"],
                "columns": {"mt_bench": "mt_bench/score"}, "more": ["mt_bench/turn1", "mt_bench/turn2"]}

    def items(self, folder: Path, key: str, entry: dict) -> dict[str, float]:
        """"mt_bench/score" (both turns pooled), "mt_bench/turn1" or "mt_bench/turn2"."""
        files = sorted((Path(folder) / "model_judgment").glob("*_single.jsonl"))
        if len(files) != 1:
            raise FileNotFoundError(f"{folder}/model_judgment: expected one *_single.jsonl, found {len(files)}")
        turn = {"mt_bench/score": None, "mt_bench/turn1": 1, "mt_bench/turn2": 2}[key]
        return items(files[0], turn)


BENCHMARK = MTBench()
