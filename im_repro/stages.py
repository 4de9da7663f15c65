"""The pipeline's stages, registered once: the entrypoint, the run store's units, the dry-run plan and the SLURM
phases all read `STAGES`.

    prepare -> train -> eval | heldout_loss | memorization          (the report runs once per experiment)

A stage declares its name, the stages whose outputs it reads (`needs`), its key (`settings`: exactly what can change
its output, im_repro/keys.py), its run function, the SLURM phase it runs in with that phase's resources
(conf/launch/), and which processes of a multi-process launch run it. Its module does the work; adding a stage is
one entry here and its module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from im_repro import data, heldout_loss, keys, memorization, prepare, train
from im_repro.common import UserError
from im_repro.evaluate import suite
from im_repro.model import Evaluated, checkpoint_identity, evaluated
from im_repro.runs import Job, Unit, read_record

TRAINING = ("prepare", "train")  # what a method that trains nothing (method=base) leaves out


@dataclass(frozen=True)
class Stage:
    name: str
    settings: Callable | None  # (cfg, evaluated model or None) -> its key's settings; None: `units` says per unit
    run: Callable[[Job], None]  # does the job's units, calling job.finish(unit, summary) as each is complete
    needs: tuple[str, ...] = ()
    phase: str = "train"  # the SLURM phase (launch.phase) whose job runs it
    # all: every process of a launch (data parallel); main: rank 0 alone; one: refused under a multi-process launch
    ranks: str = "all"
    scores_model: bool = False  # reads a model it did not train: keyed by what that model is (model.Evaluated)
    units: Callable[[object, Path, Evaluated | None], list[Unit]] | None = None  # several units (a suite's benchmarks)

    def units_of(self, cfg, run_dir: Path, model: Evaluated | None) -> list[Unit]:
        if self.units is not None:
            return self.units(cfg, run_dir, model)
        return [Unit(self.name, run_dir / self.name, self.settings(cfg, model))]


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("prepare", prepare.settings, prepare.run, ranks="one"),
    Stage("train", train.settings, train.run, needs=("prepare",)),
    Stage("eval", None, suite.run, needs=("train",), phase="eval", scores_model=True, units=suite.units),
    Stage("heldout_loss", heldout_loss.settings, heldout_loss.run, needs=("prepare", "train"), phase="eval",
          ranks="main", scores_model=True),
    Stage("memorization", memorization.settings, memorization.run, needs=("train",), phase="eval", ranks="main",
          scores_model=True),
)}
PHASES = tuple(dict.fromkeys(stage.phase for stage in STAGES.values()))


def trains(cfg) -> bool:
    """Whether the run trains a model: every method but the untuned base model's (method.mask=null)."""
    return cfg.method.mask is not None


def pipeline(cfg) -> list[str]:
    """The run's stages, in `stages` order, whatever phase this job runs: without prepare and train when nothing is
    trained (method=base). Unknown stage names are refused."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise UserError(f"stages={list(cfg.stages)}: unknown {unknown}; available: {list(STAGES)}")
    return [s for s in cfg.stages if trains(cfg) or s not in TRAINING]


def of_phase(cfg) -> list[str]:
    """The stages this job runs: the pipeline, or only its part in `launch.phase` (a SLURM phase)."""
    phase = cfg.launch.phase
    if phase is not None and phase not in PHASES:
        raise UserError(f"launch.phase={phase!r}: choose from {list(PHASES)}")
    return [s for s in pipeline(cfg) if phase is None or STAGES[s].phase == phase]


def train_key(cfg) -> str | None:
    """The key of the model the run trains (None: it trains nothing), from the settings: a trained model scored here is
    this run's only when its marker records the same key (`check_needs`)."""
    return keys.digest(train.settings(cfg, None)) if trains(cfg) else None


@dataclass(frozen=True)
class Plan:
    """The keyed units of each stage a command runs in a run directory, and the model those that score one score."""

    units: dict[str, list[Unit]]
    model: Evaluated | None

    def all(self) -> list[Unit]:
        return [unit for units in self.units.values() for unit in units]


def plan(cfg, run_dir: Path, names: list[str]) -> Plan:
    model = evaluated(cfg, run_dir, train_key(cfg)) if any(STAGES[n].scores_model for n in names) else None
    return Plan({name: STAGES[name].units_of(cfg, run_dir, model) for name in names}, model)


def requires(name: str) -> list[str]:
    """`name` and every stage it needs, directly or not, in pipeline order."""
    found, todo = set(), [name]
    while todo:
        stage = todo.pop()
        found.add(stage)
        todo += [n for n in STAGES[stage].needs if n not in found]
    return [s for s in STAGES if s in found]


def check_needs(cfg, run_dir: Path, names: list[str], model: Evaluated | None) -> None:
    """Refuse, before any work, a stage whose inputs are neither made by this command nor finished in the run
    directory under its settings: eval before train would otherwise score the untrained model as the method's."""
    for name in names:
        for need in STAGES[name].needs:
            if need in names or (need in TRAINING and not trains(cfg)):
                continue
            if need == "train" and model is not None and model.kind != "trained":
                continue  # a checkpoint named by eval.checkpoint is scored, not this run's training
            unit = STAGES[need].units_of(cfg, run_dir, None)[0]
            state = unit.state()
            if state == "done":
                continue
            why = {"new": "is not there", "partial": "did not finish", "stale": "was made under other settings"}[state]
            raise UserError(
                f"stage {name} needs the {need} stage's output, and {unit.path} {why}. Run it first, in one command "
                f"with the same overrides: stages=[{','.join(requires(name))}]"
                + ("; to score a model as it is instead: method=base (the base model) or eval.checkpoint=FOLDER"
                   if need == "train" else ""))


def run_name(cfg) -> str:
    """`<data>__<model>__<method>__<train>__seed<k>__<key>` (key: the short hash of what the run trains); the base
    model's runs have no data or recipe: `base__<model>__seed<k>__<key of the model>`; a checkpoint scored as it is
    (eval.checkpoint): `checkpoint__<its folder or Hub id>__seed<k>__<key of what it is>`."""
    if cfg.eval.checkpoint:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(Path(cfg.eval.checkpoint).parts[-3:]))
        return f"checkpoint__{name}__seed{cfg.seed}__{keys.digest(checkpoint_identity(cfg.eval.checkpoint))[:6]}"
    if not trains(cfg):
        key = keys.digest({"base": keys.model_settings(cfg)})[:6]
        return f"{cfg.method.name}__{cfg.model.name}__seed{cfg.seed}__{key}"
    key = keys.digest(train.settings(cfg, None, contents=False))[:6]
    return f"{data.label(cfg.data)}__{cfg.model.name}__{cfg.method.name}__{cfg.train.name}__seed{cfg.seed}__{key}"

