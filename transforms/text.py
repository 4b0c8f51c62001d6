"""Vectorised text helpers over Arrow string arrays and conversation lists."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from transforms.schema import MESSAGE

StringOp = Callable[[pa.Array], pa.Array]


def combined(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array from a possibly chunked one."""
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def map_contents(prompt: pa.Array | pa.ChunkedArray, op: StringOp) -> pa.ListArray:
    """Apply a string operation to the ``content`` of every turn of every conversation."""
    prompt = combined(prompt)
    flat = pc.list_flatten(prompt)
    turns = pa.StructArray.from_arrays(
        [flat.field("role"), op(flat.field("content"))], fields=list(MESSAGE)
    )
    offsets = prompt.offsets
    if len(offsets) and offsets[0].as_py() != 0:
        offsets = pc.subtract(offsets, offsets[0])
    return pa.ListArray.from_arrays(offsets, turns, type=pa.list_(MESSAGE), mask=prompt.is_null())


def prompt_chars(prompt: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Total characters over all turns of each conversation."""
    prompt = combined(prompt)
    flat = pc.list_flatten(prompt)
    lengths = pc.fill_null(pc.utf8_length(flat.field("content")), 0)
    parents = pc.list_parent_indices(prompt)
    sums = pa.table({"row": parents, "n": lengths}).group_by("row").aggregate([("n", "sum")])
    out = pa.nulls(len(prompt), pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).copy()
    out[sums.column("row").to_numpy()] = sums.column("n_sum").to_numpy()
    return pa.array(out)
