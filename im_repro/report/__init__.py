"""The report stage: an experiment's tables and figures from the run store, beside the paper's numbers.

    python -m im_repro.report experiment=table1 [the sweep's own overrides, e.g. model=tiny]

The runs come from the experiment's sweep, not from a folder: every job of `hydra.sweeper.params` (with this
command's overrides, as the multirun had them) names one run in `runs_dir` by its settings (collect.wanted); a run
not there leaves its cells "missing: run X not found". Each table named in `report.tables` is written as Markdown, CSV
and LaTeX, each figure in `report.figures` as PNG and PDF, all under `report.output_dir`, together with
`report.json` (what was written, what was skipped and why, the runs used) and `summary.md`. A cell without a number
says why (the eval stage's `missing` reason, a failed stage, a stage never run); a figure without data is not drawn.

    collect.py  which runs: the sweep's jobs found in the store      tables.py   numbers, rows, seeds (mean, std, n)
    render.py   Markdown, CSV, LaTeX with notes and provenance       figures.py  curves, histograms, Figure 2
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from im_repro.config import StatsConfig
from im_repro.report.collect import Run, identity, load_runs, wanted
from im_repro.report.figures import FIGURE_FILES, FIGURES, figure2_points, write_figure
from im_repro.report.render import TABLE_FILES, write_table
from im_repro.report.tables import TABLES, suite_columns
from im_repro.common import UserError, write_json
from im_repro.runs import REPO, now

__all__ = ["run", "load_runs", "wanted", "figure2_points", "identity", "TABLES", "FIGURES"]
log = logging.getLogger("im_repro")


def summary_markdown(report: dict) -> str:
    found = sum(r["status"] is not None for r in report["runs"])
    runs = f"the {len(report['runs'])} runs of the experiment ({found} found in {report['runs_dir']})"
    lines = [f"# Report: {report['experiment']}", "", *([f"**{report['label']}**", ""] if report["label"] else []),
             f"Generated {report['generated']} from {runs}.",
             "", "## Written", "", *([f"- {name}: {', '.join(Path(f).name for f in files)}"
                                      for name, files in report["written"].items()] or ["None."]),
             "", "## Skipped", "", *([f"- {name}: {why}" for name, why in report["skipped"].items()] or ["None."])]
    return "\n".join(lines) + "\n"


def run(cfg, runs: list[Run]) -> dict:
    """Every table and figure the report config names, from `runs` (those of `cfg.experiment`); returns
    report.json."""
    rc = cfg.report
    for kind, names, known in (("tables", rc.tables, TABLES), ("figures", rc.figures, FIGURES)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(f"report.{kind}={list(names)}: unknown {unknown}; choose from {sorted(known)}")
    root = Path(cfg.runs_dir)
    if not any(r.manifest for r in runs):
        names = ", ".join(r.path.name for r in runs[:3]) + (", ..." if len(runs) > 3 else "")
        raise UserError(f"none of the {len(runs)} runs of experiment={cfg.experiment} is in {root} "
                                f"({names or 'no run'}); run the experiment's sweep first, with the same overrides")
    out = Path(rc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"experiment": cfg.experiment, "label": rc.label, "generated": now(), "runs_dir": str(root),
              "output_dir": str(out),
              "runs": [{"path": str(r.path), "status": r.invocation.get("status"), **identity(r)} for r in runs],
              "written": {}, "skipped": {}}
    settings = StatsConfig(**cfg.stats) if "stats" in cfg else StatsConfig()
    specs = {name: TABLES[name] for name in rc.tables}
    specs = {name: replace(spec, columns=suite_columns(runs, spec.suite)) if spec.suite else spec
             for name, spec in specs.items()}
    jobs = [(name, TABLE_FILES, partial(write_table, name, spec, settings)) for name, spec in specs.items()]
    jobs += [(name, FIGURE_FILES, partial(write_figure, name)) for name in rc.figures]
    for name, suffixes, write in jobs:
        result = write(runs, rc.label, rc.baseline, out)
        if isinstance(result, str):
            for suffix in suffixes:  # an old file would pass for this run's result
                (out / f"{name}{suffix}").unlink(missing_ok=True)
            report["skipped"][name] = result
            log.warning("report: %s not written: %s", name, result)
        else:
            report["written"][name] = result
            log.info("report: wrote %s", ", ".join(result))
    write_json(out / "report.json", report)
    (out / "summary.md").write_text(summary_markdown(report), encoding="utf-8")
    log.info("report: %d written (%s), %d skipped (reasons in %s) -> %s", len(report["written"]),
             ", ".join(report["written"]) or "none", len(report["skipped"]), out / "summary.md", out)
    return report


def main() -> None:
    import im_repro.run  # noqa: F401  (the schema and resolvers; imported here so importing this module stays light)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from im_repro.config import renamed

    if problem := renamed(sys.argv[1:]):
        sys.exit(f"im_repro.report: {problem}")

    # Hydra's default run directory is a run's own folder, whose .hydra/ would be overwritten: keep the report's
    # Hydra files beside its output unless the command line says otherwise.
    if not any(arg.startswith("hydra.run.dir=") for arg in sys.argv[1:]):
        sys.argv.append("hydra.run.dir=${report.output_dir}/.hydra_report")
    # The multirun's own comma lists (`make reproduce-plw ARGS="seed=1,2,3"` passes them here too) name the runs to
    # report; Hydra refuses them outside a multirun, so they go to `wanted` past its composition.
    parser = OverridesParser.create()
    swept = [arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")
             and (o := parser.parse_override(arg)).is_sweep_override() and not o.is_hydra_override()]
    sys.argv = [arg for arg in sys.argv if arg not in swept]

    @hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="config")
    def report_main(cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        overrides = [o for o in hc.overrides.task if not o.startswith("report.")]  # what the runs were made with
        try:
            run(cfg, wanted(Path(cfg.runs_dir), dict(hc.sweeper.params or {}), overrides + swept))
        except UserError as e:  # a message, not a traceback (HYDRA_FULL_ERROR=1: the traceback)
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            sys.exit(f"im_repro.report: error: {e}")

    report_main()
