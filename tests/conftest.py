"""Shared fixtures: real tokenizers built by `make setup` (artifacts/), the shared paper data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("default", max_examples=50)
settings.register_profile("thorough", max_examples=1000)  # HYPOTHESIS_PROFILE=thorough make test
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# `make test` runs the suite in pytest-xdist workers, one per core: each gets its share of the cores for torch's and
# OpenMP's thread pools (and the subprocesses it starts), so the workers do not oversubscribe them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("IM_REPRO_ARTIFACTS", REPO / "artifacts"))
SHARED_DATA = REPO.parent / "shared" / "data" / "paper"
# Hand-written conversations in the paper's messages format (single- and multi-turn, system messages, instructions
# and outputs long enough to be truncated): what the core tests train on, so a clone without ../shared runs them.
CONVERSATIONS = REPO / "tests" / "data" / "conversations.jsonl"


def _artifact(*parts: str) -> Path:
    path = ARTIFACTS.joinpath(*parts)
    if not path.exists():
        # Not a skip: without the artifacts the suite would pass while testing nothing.
        pytest.fail(f"{path} is missing: run `make setup` (it builds the offline tokenizers and models)")
    return path


@pytest.fixture(scope="session")
def llama2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_artifact("tokenizers", "llama2"))


@pytest.fixture(scope="session")
def llama2_slow():
    from im_repro.model import load_slow_sentencepiece

    _artifact("tokenizers", "llama2", "tokenizer.model")
    return load_slow_sentencepiece(str(ARTIFACTS / "tokenizers" / "llama2"))


@pytest.fixture(scope="session")
def gpt2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_artifact("tokenizers", "gpt2"))


@pytest.fixture(scope="session")
def smollm2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_artifact("tokenizers", "smollm2"))


@pytest.fixture(scope="session", params=["llama2", "gpt2", "smollm2"])
def any_tokenizer(request):
    return request.getfixturevalue(request.param)


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the paper's data lives in ../shared/data/paper beside the checkout)")
    return path


def compose_with(*overrides: str, hydra: bool = False):
    """The composed config for these overrides, as `im-repro` would see it."""
    from hydra import compose, initialize_config_dir

    import im_repro.run  # noqa: F401  (registers the schema and the artifacts resolver)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)
