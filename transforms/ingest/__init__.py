"""Ingest: corpus files → canonical Arrow batches (the first stage of every build).

Formats (:data:`FORMATS`): ``alpaca``, ``sharegpt``, ``messages`` (OpenAI/TRL),
``prompt_completion`` (TRL), ``mcq_csv`` (MMLU), ``open_qa`` (NQ) and ``self_instruct``.
File types: JSON arrays, JSON lines (plain, ``.gz``, ``.zst``), CSV, Parquet and
``datasets`` ``save_to_disk`` directories, all streamed with bounded memory.

A file that cannot be read, parsed or recognised raises :class:`IngestError`; a record that
cannot become a row goes to the ``rejected`` split with a reason.
"""

from transforms.ingest.errors import IngestError
from transforms.ingest.formats import FORMATS, detect_format
from transforms.ingest.params import IngestParams, ShareGPTTags
from transforms.ingest.source import Batch, read_source, source_batches

__all__ = [
    "FORMATS",
    "Batch",
    "IngestError",
    "IngestParams",
    "ShareGPTTags",
    "detect_format",
    "read_source",
    "source_batches",
]
