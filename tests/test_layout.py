"""The house's plan, checked from the source: an acyclic import graph, short functions, every stage registered with
its resources, the README's layout equal to the tree, and configs that state only what differs from their schema."""

from __future__ import annotations

import ast
import dataclasses
import enum
import re
import typing
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGE = REPO / "im_repro"
CONF = REPO / "conf"


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `path` imports, at any depth of the file (lazy imports in functions count too):
    `from a import b` names the module a.b where there is one, else a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module in known:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(known)
            found |= subs or {node.module}
            if len(subs) < len(node.names):  # names from the module itself, beside its submodules
                found.add(node.module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():  # so the test above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


MAX_LINES = 80


def test_no_function_is_longer_than_80_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_every_stage_is_registered_with_its_resources():
    from im_repro.config import LaunchConfig
    from im_repro.stages import PHASES, STAGES

    assert list(STAGES) == ["prepare", "train", "eval", "heldout_loss", "memorization"]
    assert set(LaunchConfig().resources) == {*STAGES, "report"}
    assert set(PHASES) == {"train", "eval"}  # the phases `make reproduce-* LAUNCHER=slurm` runs, in order
    assert all(need in STAGES and list(STAGES).index(need) < list(STAGES).index(s.name)
               for s in STAGES.values() for need in s.needs)


def readme_layout() -> list[str]:
    """The modules the README's layout block lists under `im_repro/`, in order, by dotted name: a line's first word
    names its package (`evaluate/`) or is a top-level module, and an indented continuation line keeps the package."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Layout"):].split("```")[1]
    lines = block[block.index("im_repro/"):block.index("\nconf/")].splitlines()[1:]
    order, package = [], None
    for line in lines:
        words = line.split()
        if not line.startswith("   "):  # a new entry
            package = words[0].rstrip("/") if words[0].endswith("/") else None
        found = [w.removesuffix(".py") for w in words if re.fullmatch(r"[a-z_]+\.py", w)]
        order += [f"im_repro.{package}.{m}" if package else f"im_repro.{m}" for m in found]
    packages = {name.rsplit(".", 1)[0] for name in order if name.count(".") == 2}
    for pkg in packages:  # a package's __init__ comes after its last module listed
        last = max(i for i, name in enumerate(order) if name.startswith(pkg + "."))
        order.insert(last + 1, pkg)
    return order


def test_the_readme_layout_lists_every_module_each_after_what_it_imports():
    known = modules()
    listed = readme_layout()
    missing = set(known) - {"im_repro"} - set(listed) - {"im_repro.__main__", "im_repro.report.__main__"}
    assert not missing and set(listed) <= set(known), {"not listed": sorted(missing),
                                                       "no such module": sorted(set(listed) - set(known))}
    late = [f"{name} imports {dep}" for i, name in enumerate(listed)
            for dep in imports(known[name], known) if dep in listed and listed.index(dep) > i]
    assert not late, "the README's layout is the order of the imports: " + "; ".join(late)


# ------------------------------------------------------------------------------------------ configs -----------


def schema_default(cls, name: str):
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def plain(value):
    return value.value if isinstance(value, enum.Enum) else value


def leaves(cls, values: dict, path: str, base=None):
    """(dotted path, value, the schema's default or MISSING) for every value a YAML file sets on schema `cls`."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            continue
        kind, here = hints[key], f"{path}.{key}" if path else key
        default = getattr(base, key) if base is not None else schema_default(cls, key)
        args = typing.get_args(kind)
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            yield from leaves(kind, value, here, default if dataclasses.is_dataclass(default) else None)
        elif typing.get_origin(kind) is dict and args and dataclasses.is_dataclass(args[1]) and isinstance(value, dict):
            for k, v in value.items():
                known = default.get(k) if isinstance(default, dict) else None
                yield from leaves(args[1], v, f"{here}.{k}", known) if isinstance(v, dict) else ()
        elif not (isinstance(value, str) and "${" in value):
            yield here, value, default


def config_values(conf: Path) -> dict[Path, list[tuple[str, object, object]]]:
    """Every file under `conf` typed by the schema: the values it sets, with their schema defaults."""
    from im_repro import config

    groups = {"data": config.DataConfig, "model": config.ModelConfig, "train": config.TrainConfig,
              "eval": config.EvalConfig, "analysis": config.AnalysisConfig}
    found = {}
    for path in sorted(conf.rglob("*.yaml")):
        group = path.relative_to(conf).parts[0]
        text = path.read_text()
        values = {k: v for k, v in (yaml.safe_load(text) or {}).items() if k not in ("defaults", "hydra")}
        if "@package _global_" in text:
            found[path] = list(leaves(config.Config, values, ""))
        elif group in groups:
            found[path] = list(leaves(groups[group], values, group))
    return found


def config_problems(conf: Path) -> list[str]:
    """A value equal to its schema default is a second home for the default, unless it undoes another config's
    value (debug=default resets what an experiment sets); a group's `default.yaml` sets no value the schema has."""
    found = config_values(conf)
    differing = {where for values in found.values() for where, value, default in values if plain(default) != value}
    problems = []
    for path, values in found.items():
        for where, value, default in values:
            if default is dataclasses.MISSING:
                continue
            same = plain(default) == value and type(plain(default)) is type(value)
            if same and where not in differing:
                problems.append(f"{path.relative_to(conf)}: {where}: {value!r} repeats the schema's default")
            elif not same and path.name == "default.yaml" and "@package" not in path.read_text():
                problems.append(f"{path.relative_to(conf)}: {where}: {value!r} contradicts the schema's {default!r}")
    return problems


def test_configs_state_only_what_differs_from_the_schema():
    assert not config_problems(CONF), config_problems(CONF)


def test_the_config_check_finds_a_repeat_and_a_contradiction(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "analysis").mkdir()
    (tmp_path / "train" / "mine.yaml").write_text("name: mine\nepochs: 2.0\nlearning_rate: 1.0e-4\n")
    (tmp_path / "analysis" / "default.yaml").write_text("max_new_tokens: 512\n")
    assert config_problems(tmp_path) == [
        "analysis/default.yaml: analysis.max_new_tokens: 512 contradicts the schema's 2048",
        "train/mine.yaml: train.epochs: 2.0 repeats the schema's default"]
