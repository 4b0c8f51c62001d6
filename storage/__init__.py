"""Delta-backed versioned datasets: commit, read, tag, diff and export.

store = DatasetStore()  # $ALIGNCURATE_STORE or ./datasets
version = store.commit("sft", train_shards, rejected_shards, {"build_id": run_id})
store.tag(f"sft@{version}", "prod")
files = store.files("sft@prod")  # the Parquet files of exactly that version
ds = store.load("sft@prod")  # a Hugging Face Dataset of them; also to_pandas, to_polars
"""

from storage.dataset import DatasetStore, VersionInfo, default_store
from storage.diff import DatasetDiff
from storage.export import EXPORT_FORMATS, FORMATS, ExportResult, export
from storage.names import Ref, StoreError, parse_ref, validate_name

__all__ = [
    "EXPORT_FORMATS",
    "FORMATS",
    "DatasetDiff",
    "DatasetStore",
    "ExportResult",
    "Ref",
    "StoreError",
    "VersionInfo",
    "default_store",
    "export",
    "parse_ref",
    "validate_name",
]
