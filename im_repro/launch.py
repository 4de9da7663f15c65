"""Job plans and multi-node launching.

`dry_run=true` turns every job of a sweep into a plan entry instead of work: its stages with the resources each asks
for (conf/launch/), what it waits for, whether the run store already holds it under the same key ("reused"), holds
it under another ("stale": the job would refuse) or not ("to run"), and an estimate of train GPU-hours from
tokens x parameters at an assumed utilisation. `PlanPrinter`, a Hydra callback, prints the sweep's plan as one table
with the experiment's report job, which waits for every eval, and the GPU-hours that reuse saves.

Under SLURM, a job that asks for several nodes runs one task per node; each re-executes its own command under
`accelerate launch` with the node's rank and the first node as the main process (`accelerate_command`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from im_repro import stages
from im_repro.runs import Unit


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


STATES = {"done": "reused", "partial": "to run (resumes)", "new": "to run", "stale": "stale: refused (force=true)"}


def stage_state(units: list[Unit]) -> str:
    """reused when every unit is done under its key; stale when any was made under another; else to run."""
    states = [u.state() for u in units]
    if all(s == "done" for s in states):
        return STATES["done"]
    return STATES["stale"] if "stale" in states else STATES["partial" if "partial" in states else "new"]


def plan(cfg, run_dir: Path) -> dict:
    """One run's jobs: {run, stages: [{stage, after, state, resources, gpu_hours}]}."""
    entries, names = [], stages.of_phase(cfg)
    units = stages.plan(cfg, run_dir, names).units
    for i, stage in enumerate(names):
        res = cfg.launch.resources.get(stage)
        if res is None:
            raise ValueError(f"launch.resources has no entry for stage {stage!r} (conf/launch/default.yaml)")
        entry = {"stage": stage, "after": names[i - 1] if i else None,
                 "state": stage_state(units[stage]),
                 "resources": {k: res[k] for k in ("nodes", "gpus", "cpus", "mem_gb", "hours")}}
        if stage == "train":
            entry["gpu_hours"], entry["basis"] = gpu_hours(cfg, run_dir)
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
    jobs = sum(len(p["stages"]) for p in plans) + len(experiments)
    lines.append(f"{len(plans)} runs, {jobs} jobs; about {total:,.0f} GPU-hours still to spend, "
                 f"{saved:,.0f} saved by reusing finished stages (train: 6 x params x tokens x epochs at the assumed "
                 f"utilisation; other GPU stages: their time limit)")
    return "\n".join(lines)


class PlanPrinter(Callback):
    """Collects every job's plan of a dry-run sweep and prints them together (jobs themselves print nothing)."""

    def __init__(self):
        self.plans: list[dict] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        value = getattr(job_return, "_return_value", None)
        if isinstance(value, dict) and "stages" in value:
            self.plans.append(value)

    def on_run_end(self, config, **kwargs) -> None:
        self.on_multirun_end(config)

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.plans:
            print(format_plan(self.plans))
            self.plans = []


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
