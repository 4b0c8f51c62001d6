"""Parameters of the ingest step (part of the build spec's ``ingest:`` section)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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

    batch_rows: int = Field(65_536, ge=1, description="rows per yielded batch (kept + rejected)")
    sharegpt_tags: ShareGPTTags = ShareGPTTags()
