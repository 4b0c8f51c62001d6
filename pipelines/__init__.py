"""The Prefect flows, their tasks and the command line.

Importing the package makes jemalloc Arrow's default memory pool for the process, on Linux,
unless ``ARROW_DEFAULT_MEMORY_POOL`` is set already. Arrow reads the variable once, when pyarrow
is first imported, so it is set here, before any module of the package imports pyarrow.
jemalloc hands freed pages back to the system within a second; the mimalloc default kept
them resident: a 1M-row build of 16,384-row shards peaked at 468 MiB with mimalloc and 416
MiB with jemalloc, for the same CPU time (docs/performance.md, #17).
"""

import os
import sys

if sys.platform == "linux":  # pyarrow's Linux wheels have jemalloc; others may not, and warn
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
