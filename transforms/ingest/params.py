"""Parameters of the ingest step (part of the build spec's ``ingest:`` section)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from transforms.ingest.structure import Bounds


class ShareGPTTags(BaseModel):
    """How a ShareGPT file names its columns and roles.

    The names follow the ``columns`` and ``tags`` of LLaMA-Factory's ``dataset_info.json``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: str = Field("conversations", description="column holding the list of turns")
    system: str = Field("system", description="column holding the system prompt")
    tools: str = Field("tools", description="column holding the tool schemas (JSON)")
    role_tag: str = Field("from", description="key of a turn's role")
    content_tag: str = Field("value", description="key of a turn's text")
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = Field("observation", description="a tool's output: role `tool`")
    function_tag: str = Field("function_call", description="a tool call: role `tool_call`")
    system_tag: str = "system"


class IngestParams(BaseModel):
    """How to read corpus files."""

    model_config = ConfigDict(extra="forbid")

    batch_rows: int = Field(16_384, ge=1, description="rows per yielded batch (kept + rejected)")
    sharegpt_tags: ShareGPTTags = ShareGPTTags()
    max_depth: int = Field(
        Bounds.max_depth,
        ge=1,
        le=500,  # json.loads recurses: stay well inside Python's recursion limit
        description="deepest nesting of a JSON record; a deeper one is rejected as "
        "too_deep:<field>",
    )
    max_record_bytes: int = Field(
        Bounds.max_record_bytes,
        ge=1 << 10,
        description="largest JSON record (line or array element), in bytes, and CSV field, "
        "in characters; a larger JSON record is rejected as too_large:record, a larger CSV "
        "field fails the file",
    )

    @property
    def bounds(self) -> Bounds:
        """The depth and size bounds of one record."""
        return Bounds(self.max_depth, self.max_record_bytes)
