"""What the benchmark scripts share: running one measurement in a fresh child process.

A script re-runs itself as ``python SCRIPT --child ARGS...``; the child prints its result as
a JSON object on its last stdout line. Imported as ``bench.harness`` (the scripts put the
repository first on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(script: str, *args: str) -> dict:
    """Run ``script --child *args`` and return its JSON result plus its peak RSS (wait4)."""
    proc = subprocess.Popen(
        [sys.executable, script, "--child", *args], stdout=subprocess.PIPE, cwd=REPO
    )
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{args[0]} child failed with status {status}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    return result
