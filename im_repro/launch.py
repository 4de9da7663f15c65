"""Job plans, sweep accounts and multi-node launching.

`dry_run=true` turns every job of a sweep into a plan entry instead of work: its stages with the resources each asks
for (launch.resources), what it waits for, whether the run store already holds it under the same key ("reused"),
holds it under another ("stale": the job would refuse) or not ("to run"), and an estimate of GPU-hours: train from
tokens x parameters at an assumed utilisation, eval and memorization from the tokens each benchmark scores and
generates (its suite's settings and `launch.eval_sizes`) at each engine's throughput (`launch.eval_throughput`,
assumed until the GPU check measures it), per benchmark and per engine (HF, vLLM). `SweepReport`, a Hydra callback, prints the sweep's plan as one table
with the experiment's report job, which waits for every eval, and the GPU-hours that reuse saves; after a real sweep,
its account: every job done, reused or failed (with its run folder, stage and last error line).

Under SLURM, a job that asks for several nodes runs one task per node; each re-executes its own command under
`accelerate launch` with the node's rank and the first node as the main process (`accelerate_command`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from hydra.experimental.callback import Callback

from im_repro import stages
from im_repro.common import UserError, read_json, write_json
from im_repro.evaluate import generate, suite
from im_repro.config import validate
from im_repro.runs import Unit

log = logging.getLogger("im_repro")


def train_tokens(cfg, run_dir: Path) -> tuple[float, str]:
    """Tokens one epoch trains on: counted by prepare when it ran, else examples x an assumed length."""
    stats = run_dir / "prepare" / "data_stats.json"
    if stats.exists():
        return float(json.loads(stats.read_text())["tokenization"]["tokens"]["total"]), "prepared"
    examples = cfg.data.limit or cfg.data.paper_size
    if not examples:
        return 0.0, "unknown size"
    return float(examples * cfg.launch.tokens_per_example), f"{examples} examples x {cfg.launch.tokens_per_example}"


def gpu_hours(cfg, run_dir: Path) -> tuple[float, str]:
    """6 N D FLOPs per epoch (forward + backward) at `utilisation` of the GPU's peak; KL adds a reference forward."""
    tokens, basis = train_tokens(cfg, run_dir)
    flops_per_token = 6 + (2 if cfg.train.kl.mode != "none" else 0)
    flops = flops_per_token * cfg.model.params_b * 1e9 * tokens * cfg.train.epochs
    hours = flops / (cfg.launch.gpu_peak_tflops * 1e12 * cfg.launch.utilisation) / 3600
    return hours, basis


def workload(size, documents: int, fewshot: int | None, requests: float, generated: int) -> dict:
    """Tokens one benchmark scores (prompts through a forward pass) and generates: a generating task prefills each
    document's prompt once for all its samples; a multiple-choice one scores every choice with its prompt."""
    prompt = size.example_tokens * ((size.fewshot if fewshot is None else fewshot) + 1)
    if generated:
        return {"documents": documents, "scored": documents * prompt, "generated": documents * requests * generated}
    return {"documents": documents, "scored": documents * requests * prompt, "generated": 0}


def eval_work(cfg, stage: str) -> dict[str, dict]:
    """What each benchmark of the eval stage (or the memorization stage) computes, from the suite's settings and
    `launch.eval_sizes`: {name: {documents, scored, generated tokens, engine: harness | generation}}, or
    {name: {unknown: why}} for a benchmark with no size."""
    sizes, out = cfg.launch.eval_sizes, {}
    if stage == "memorization":
        size, a = sizes["memorization"], cfg.analysis
        documents = min(n for n in (a.memorization_limit, cfg.data.limit or cfg.data.paper_size, size.documents) if n)
        return {"memorization": {**workload(size, documents, 0, 1, min(size.generated_tokens, a.max_new_tokens)),
                                 "engine": "generation"}}
    for name, entry in suite.select(suite.suite(cfg), cfg.eval.only).items():
        kind = entry["kind"]
        if kind == "harness":
            spec = cfg.eval.harness.tasks[name]
            task, limit, fewshot, factor, cap = spec.task, spec.limit or cfg.eval.harness.limit, spec.num_fewshot, 1, None
        else:
            settings = cfg.eval[kind]
            task, limit, fewshot, cap = kind, settings.limit, None, settings.max_new_tokens
            if limit and kind == "arena_hard":  # its limit counts the questions of each category
                limit *= len(settings.categories)
            factor = settings.n * len(settings.temperatures) if kind == "humaneval" else 1
        size = sizes.get(task)
        if size is None:
            out[name] = {"unknown": f"no launch.eval_sizes.{task}"}
            continue
        documents = min(size.documents, limit) if limit else size.documents
        generated = min(size.generated_tokens, cap) if cap else size.generated_tokens
        out[name] = {**workload(size, documents, fewshot, size.requests * factor, generated),
                     "engine": "harness" if kind == "harness" else "generation"}
    return out


def planned_backend(cfg, engine: str) -> str:
    """The engine a benchmark would run on: eval.harness.backend for lm-eval's tasks; eval.generation.backend for
    the rest, auto counted as vllm where vLLM is installed for eval.generation.vllm_python (as on a GPU node with
    this environment), else hf."""
    if engine == "harness":
        return cfg.eval.harness.backend
    g = cfg.eval.generation
    if g.backend != "auto":
        return g.backend
    return "vllm" if generate.vllm_version(g.vllm_python or sys.executable) else "hf"


def eval_hours(cfg, stage: str) -> tuple[float, dict[str, dict]]:
    """(GPU-hours on the engines the config chooses, per benchmark its tokens and GPU-hours on each engine):
    tokens / (throughput x 7B / params_b), at launch.eval_throughput's assumed rates."""
    scale = 7.0 / cfg.model.params_b if cfg.model.params_b else 0.0
    found, total = eval_work(cfg, stage), 0.0
    for work in found.values():
        if "unknown" in work:
            continue
        for backend, rate in cfg.launch.eval_throughput.items():
            seconds = work["scored"] / rate.scored_tokens_per_s + work["generated"] / rate.generated_tokens_per_s
            work[backend] = seconds / scale / 3600 if scale else 0.0
        total += work[planned_backend(cfg, work["engine"])]
    return total, found


STATES = {"done": "reused", "partial": "to run (resumes)", "new": "to run", "stale": "stale: refused (force=true)"}


def stage_state(units: list[Unit]) -> str:
    """reused when every unit is done under its key; stale when any was made under another; else to run."""
    states = [u.state() for u in units]
    if all(s == "done" for s in states):
        return STATES["done"]
    return STATES["stale"] if "stale" in states else STATES["partial" if "partial" in states else "new"]


def plan(cfg, run_dir: Path, overrides: list[str] = ()) -> dict:
    """One run's jobs: {run, stages: [{stage, after, state, resources, gpu_hours}]}, its settings checked as a real run
    would check them. Nothing is written: the empty folder Hydra made for the job goes."""
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()
    validate(cfg, overrides)
    entries, names = [], stages.of_phase(cfg)
    units = stages.plan(cfg, run_dir, names).units
    for i, stage in enumerate(names):
        res = cfg.launch.resources.get(stage)
        if res is None:
            raise UserError(f"launch.resources has no entry for stage {stage!r}: add launch.resources.{stage}=...")
        entry = {"stage": stage, "after": names[i - 1] if i else None,
                 "state": stage_state(units[stage]),
                 "resources": {k: res[k] for k in ("nodes", "gpus", "cpus", "mem_gb", "hours")}}
        if stage == "train":
            entry["gpu_hours"], entry["basis"] = gpu_hours(cfg, run_dir)
        elif stage in ("eval", "memorization"):
            entry["gpu_hours"], entry["benchmarks"] = eval_hours(cfg, stage)
            entry["basis"] = "tokens x assumed throughput"
        elif res.gpus:
            entry["gpu_hours"], entry["basis"] = res.nodes * res.gpus * res.hours, "time limit x GPUs (upper bound)"
        entries.append(entry)
    return {"run": str(run_dir), "experiment": cfg.experiment, "stages": entries,
            "report": cfg.launch.resources.get("report") is not None and bool(cfg.report.tables or cfg.report.figures)}


def format_plan(plans: list[dict]) -> str:
    """The sweep's jobs as a table, then the per-experiment report jobs and the total estimate."""
    lines = [f"{'run':74} {'stage':12} {'after':8} {'nodes x GPUs':>12} {'hours':>6} {'GPU-h':>8}  state"]
    total = saved = 0.0
    # A sweep may name one run several times (Table 3's baselines under each KL weight): it is one job.
    plans = list({p["run"]: p for p in plans}.values())
    for p in plans:
        for s in p["stages"]:
            r = s["resources"]
            gh = s.get("gpu_hours", 0.0)
            if s["state"] == STATES["done"]:
                saved += gh
            else:
                total += gh
            lines.append(f"{Path(p['run']).name:74} {s['stage']:12} {s['after'] or '-':8} "
                         f"{r['nodes']:>5} x {r['gpus']:<4} {r['hours']:>6g} {gh:>8.1f}  {s['state']}")
    experiments = sorted({p["experiment"] for p in plans if p["report"]})
    for e in experiments:
        count = sum(p["experiment"] == e for p in plans)
        lines.append(f"{'report ' + e:74} {'report':12} {'all eval':8} {'CPU':>12} {'':>6} {0:>8.1f}  "
                     f"after the {count} runs' last stages")
    lines += format_eval(plans)
    jobs = sum(len(p["stages"]) for p in plans) + len(experiments)
    lines.append(f"{len(plans)} runs, {jobs} jobs; about {total:,.0f} GPU-hours still to spend, "
                 f"{saved:,.0f} saved by reusing finished stages (train: 6 x params x tokens x epochs at the assumed "
                 f"utilisation; eval and memorization: their tokens at launch.eval_throughput's assumed rates; other "
                 f"GPU stages: their time limit)")
    return "\n".join(lines)


def format_eval(plans: list[dict]) -> list[str]:
    """Eval and memorization GPU-hours per benchmark and per engine, over the stages still to run."""
    rows: dict[str, dict] = {}
    unknown = set()
    for p in plans:
        for s in p["stages"]:
            if s["state"] == STATES["done"]:
                continue
            for name, work in s.get("benchmarks", {}).items():
                if "unknown" in work:
                    unknown.add(f"{name} ({work['unknown']})")
                    continue
                row = rows.setdefault(name, {"runs": 0})
                row["runs"] += 1
                for field in ("documents", "scored", "generated", "hf", "vllm"):
                    row[field] = row.get(field, 0) + work.get(field, 0)
    if not rows:
        return []
    lines = ["", f"eval GPU-hours still to spend, per benchmark (launch.eval_sizes' tokens at launch.eval_throughput's "
                 f"rates: assumptions until scripts/gpu_check.py measures them)",
             f"  {'benchmark':26} {'runs':>5} {'documents':>11} {'tokens scored':>14} {'generated':>13} "
             f"{'GPU-h hf':>9} {'GPU-h vllm':>10}"]
    for name, r in rows.items():
        lines.append(f"  {name:26} {r['runs']:>5} {r['documents']:>11,.0f} {r['scored']:>14,.0f} "
                     f"{r['generated']:>13,.0f} {r['hf']:>9.1f} {r['vllm']:>10.1f}")
    hf, vllm = sum(r["hf"] for r in rows.values()), sum(r["vllm"] for r in rows.values())
    lines.append(f"  {'all on hf / all on vllm':26} {'':>5} {'':>11} {'':>14} {'':>13} {hf:>9.1f} {vllm:>10.1f}"
                 f"  (vLLM saves {hf - vllm:,.0f} GPU-hours)")
    if unknown:
        lines.append(f"  not estimated (add their sizes): {', '.join(sorted(unknown))}")
    lines.append("")
    return lines


# ------------------------------------------------------------------------------------------ accounts -----------


def outcome(run_dir: Path, actions: dict[str, str]) -> dict:
    """A finished job's line in the sweep's account: done (it computed something) or reused (all was finished)."""
    return {"run": str(run_dir), "status": "reused" if all(a == "skip" for a in actions.values()) else "done"}


def failure(error: BaseException, run_dir: Path) -> dict:
    """Report a failed job. A mistake a user can fix (common.UserError) is its message, anything else its traceback
    (HYDRA_FULL_ERROR=1: always the traceback, raised). In a sweep the other jobs go on and the account lists this
    one; alone, the command ends non-zero."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if run_dir.is_dir() and not any(run_dir.iterdir()):  # Hydra made it for a job that wrote nothing
        run_dir.rmdir()
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    user = isinstance(error, UserError)
    if user:
        print(f"im-repro: error: {error}", file=sys.stderr)
    else:
        log.error("%s failed", run_dir, exc_info=error)
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        if user:
            sys.exit(2)
        raise error
    lines = str(error).strip().splitlines() or [""]
    return {"run": str(run_dir), "status": "failed", "stage": getattr(error, "stage", "start-up"),
            "error": f"{type(error).__name__}: {lines[-1]}"[:300]}


def format_account(outcomes: list[dict]) -> str:
    counts = {status: sum(o["status"] == status for o in outcomes) for status in ("done", "reused", "failed")}
    lines = [f"sweep: {len(outcomes)} jobs: " + ", ".join(f"{n} {status}" for status, n in counts.items())]
    for o in outcomes:
        if o["status"] == "failed":
            lines.append(f"  failed  {o['run']}  stage {o['stage']}  {o['error']}")
    return "\n".join(lines)


class SweepReport(Callback):
    """What a run or sweep did, printed once at its end: the plans of a dry run as one table (jobs print nothing),
    else each job's outcome (done / reused / failed, a failure with its run folder, stage and last error line). A sweep
    with a failed job exits non-zero. A job run in another process (a SLURM array) leaves its outcome in
    `<runs_dir>/.sweeps/<sweep>/`, read back at the end. A dry run writes nothing: Hydra's empty folders go."""

    def __init__(self):
        self.plans: list[dict] = []
        self.outcomes: list[dict] = []
        self.sweep, self.here, self.before = None, None, {}

    def on_multirun_start(self, config, **kwargs) -> None:
        self.sweep, self.here = uuid.uuid4().hex[:12], (socket.gethostname(), os.getpid())
        runs_dir, yaml_file = Path(config.runs_dir), Path(config.hydra.sweep.dir) / "multirun.yaml"
        self.before = {"runs_dir": runs_dir.exists(), "multirun.yaml": yaml_file.read_text() if yaml_file.exists()
                       else None}

    def on_job_end(self, config, job_return, **kwargs) -> None:
        value = job_return._return_value
        if isinstance(value, BaseException):  # raised past run_job: HYDRA_FULL_ERROR=1
            value = {"run": config.hydra.runtime.output_dir, "status": "failed", "stage": "?", "error": repr(value)}
        if not isinstance(value, dict):
            return
        if "stages" in value:
            self.plans.append(value)
        elif self.here in (None, (socket.gethostname(), os.getpid())):
            self.outcomes.append(value)
        else:  # a copy of this callback in a SLURM job: the submitting process reads it back
            folder = Path(config.runs_dir) / ".sweeps" / self.sweep
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / f"{config.hydra.job.num}.json", value)

    def on_run_end(self, config, **kwargs) -> None:
        if self.plans:
            print(format_plan(self.plans))

    def on_multirun_end(self, config, **kwargs) -> None:
        folder = Path(config.runs_dir) / ".sweeps" / str(self.sweep)
        self.outcomes += [read_json(p) for p in sorted(folder.glob("*.json"))]
        shutil.rmtree(folder, ignore_errors=True)
        if self.plans:
            print(format_plan(self.plans))
            self.forget_dry_run(config)
        if self.outcomes:
            print(format_account(self.outcomes))
        if any(o["status"] == "failed" for o in self.outcomes):
            raise SystemExit(1)

    def forget_dry_run(self, config) -> None:
        """Undo what Hydra wrote for a dry run: its multirun.yaml, and the runs folder if it made it."""
        yaml_file = Path(config.hydra.sweep.dir) / "multirun.yaml"
        if self.before.get("multirun.yaml") is None:
            yaml_file.unlink(missing_ok=True)
        else:
            yaml_file.write_text(self.before["multirun.yaml"])
        runs_dir = Path(config.runs_dir)
        if not self.before.get("runs_dir") and runs_dir.is_dir() and not any(runs_dir.iterdir()):
            runs_dir.rmdir()


def unwritable(argv: list[str]) -> str | None:
    """Why the run directory a command names (runs_dir=, hydra.run.dir=, hydra.sweep.dir=; else ./runs) cannot be
    written, or None: checked before Hydra makes the folder."""
    named = {key: value for key, _, value in (arg.partition("=") for arg in argv)
             if key in ("runs_dir", "hydra.run.dir", "hydra.sweep.dir") and value and "$" not in value}
    for key, value in (named or {"runs_dir": "runs"}).items():
        existing = Path(value).absolute()
        while not existing.exists():
            existing = existing.parent
        try:  # a real attempt: root passes permission bits, not a filesystem that refuses new files
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".im-repro-check-"))
        except OSError as e:
            return (f"{key}={value}: cannot write to {existing} ({e.strerror}). Pass a folder you can write to, "
                    f"e.g. runs_dir=$HOME/im-repro-runs")
    return None


def accelerate_command(cfg, env: dict[str, str], argv: list[str]) -> list[str] | None:
    """The command one SLURM task runs on its node of a multi-node job, or None when no re-launch is needed.

    No re-launch inside a launcher already (LOCAL_RANK set), outside SLURM, or without `launch.accelerate_config`.
    """
    if not cfg.launch.accelerate_config or "LOCAL_RANK" in env or "SLURM_JOB_ID" not in env:
        return None
    nodes = int(env.get("SLURM_NNODES", "1"))
    gpus = int(env.get("SLURM_GPUS_ON_NODE", "0") or 0) or 1
    first = first_host(env["SLURM_JOB_NODELIST"])
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg.launch.accelerate_config,
            "--num_machines", str(nodes), "--num_processes", str(nodes * gpus),
            "--machine_rank", env.get("SLURM_NODEID", "0"), "--main_process_ip", first,
            "--main_process_port", str(cfg.launch.main_process_port), "-m", "im_repro", *argv]


def first_host(nodelist: str) -> str:
    """The main process's node: the first of SLURM's compressed node list ("gpu[03-05],gpu9" -> "gpu03")."""
    if not any(c in nodelist for c in "[,"):
        return nodelist
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def relaunch(cfg, run_dir: Path, overrides: list[str]) -> bool:
    """Re-execute this job under accelerate on every node of a multi-node SLURM job; True when it did."""
    command = accelerate_command(cfg, dict(os.environ), [*overrides, f"hydra.run.dir={run_dir}"])
    if command is None:
        return False
    subprocess.run(command, check=True)
    return True
