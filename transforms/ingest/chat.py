"""Conversational formats → canonical rows: ShareGPT, OpenAI/TRL messages, TRL prompt-completion.

Roles map to ``system``, ``user``, ``assistant``, ``tool_call`` (an assistant turn calling a
tool; content is the call as JSON) and ``tool`` (the tool's output). Tool turns are kept.
The last turn must be assistant-side: a plain assistant turn, or a tool call (LLaMA-Factory
trains ``function_call`` turns as targets). It becomes ``response`` and everything before it
``prompt``; otherwise the row is rejected with ``no_assistant_turn``.

The schema has no role for ``response``: a tool-call response is its call JSON as written
(LLaMA-Factory ``{"name", "arguments"}``, or OpenAI ``tool_calls``), and :func:`is_tool_call`
is how exports tell it from a plain answer. A final call that does not have one of those
shapes is rejected (``invalid_tool_call:<field>``) rather than kept as plain text.
"""

from __future__ import annotations

import json
from typing import Any

from transforms.ingest.errors import RowReject
from transforms.ingest.fields import dump_json, json_text, optional_text, record, text
from transforms.ingest.params import IngestParams, ShareGPTTags

Turn = dict[str, str]

MESSAGE_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
"""OpenAI message roles (``developer`` and the legacy ``function`` included) → canonical roles."""


def split_response(turns: list[Turn], tools: str | None, call_field: str) -> dict[str, Any]:
    """``prompt`` / ``response`` from a conversation that must end with an assistant turn or
    a tool call; ``call_field`` names the field a malformed final call came from."""
    if not turns or turns[-1]["role"] not in ("assistant", "tool_call"):
        raise RowReject("no_assistant_turn", {"prompt": turns, "tools": tools})
    last = turns[-1]
    if last["role"] == "tool_call" and not is_tool_call(last["content"]):
        raise RowReject(f"invalid_tool_call:{call_field}", {"prompt": turns, "tools": tools})
    return {"prompt": turns[:-1], "response": last["content"], "tools": tools}


def is_tool_call(content: str | None) -> bool:
    """Whether ``content`` is, as a whole, the JSON of one call or a list of calls: each
    ``{"name": str, "arguments": ...}`` (LLaMA-Factory's ``function_call`` value) or OpenAI's
    ``{"type": "function", "function": {"name", "arguments"}}`` (``id``/``index`` allowed).
    Other keys make it plain text, so an ordinary answer is not taken for a call."""
    try:
        data = json.loads(content or "")
    except (ValueError, RecursionError):  # RecursionError: JSON text nested too deep
        return False
    items = data if isinstance(data, list) else [data]
    return bool(items) and all(_is_call(item) for item in items)


def _is_call(item: Any) -> bool:
    if isinstance(item, dict) and "function" in item:  # OpenAI's wrapper
        wrapper_keys = {"id", "index", "type", "function"}
        if not set(item) <= wrapper_keys or item.get("type", "function") != "function":
            return False
        item = item["function"]
    return (
        isinstance(item, dict)
        and isinstance(item.get("name"), str)
        and "arguments" in item
        and set(item) <= {"name", "arguments"}
    )


def listed(value: Any, field: str) -> list[Any]:
    """A required list field, or :class:`RowReject`."""
    if value is None:
        raise RowReject(f"missing_field:{field}")
    if not isinstance(value, list):
        raise RowReject(f"wrong_type:{field}")
    return value


def unknown_role(tag: str) -> RowReject:
    """The reject for a role tag the format does not know (the tag is cut to 64 characters)."""
    return RowReject(f"unknown_role:{tag[:64]}")


# --- ShareGPT --------------------------------------------------------------------------------


def sharegpt_row(value: Any, params: IngestParams) -> dict[str, Any]:
    """ShareGPT: a list of ``{from, value}`` turns, optional system and tools columns
    (names and tags from :class:`~transforms.ingest.params.ShareGPTTags`)."""
    tags = params.sharegpt_tags
    fields = record(value)
    turns: list[Turn] = []
    system = optional_text(fields.get(tags.system), tags.system)
    if system:
        turns.append({"role": "system", "content": system})
    roles = _sharegpt_roles(tags)
    turns += [
        _sharegpt_turn(item, roles, tags)
        for item in listed(fields.get(tags.messages), tags.messages)
    ]
    tools = json_text(fields.get(tags.tools), tags.tools)
    return split_response(turns, tools, f"{tags.messages}.{tags.content_tag}")


def _sharegpt_roles(tags: ShareGPTTags) -> dict[str, str]:
    return {
        tags.user_tag: "user",
        tags.assistant_tag: "assistant",
        tags.observation_tag: "tool",
        tags.function_tag: "tool_call",
        tags.system_tag: "system",
    }


def _sharegpt_turn(item: Any, roles: dict[str, str], tags: ShareGPTTags) -> Turn:
    if not isinstance(item, dict):
        raise RowReject(f"wrong_type:{tags.messages}")
    tag = text(item.get(tags.role_tag), f"{tags.messages}.{tags.role_tag}")
    role = roles.get(tag)
    if role is None:
        raise unknown_role(tag)
    content = item.get(tags.content_tag)
    field = f"{tags.messages}.{tags.content_tag}"
    if role == "tool_call" and isinstance(content, dict | list):
        content = dump_json(content, field)
    return {"role": role, "content": text(content, field)}


# --- OpenAI / TRL messages -------------------------------------------------------------------


def messages_row(value: Any, params: IngestParams) -> dict[str, Any]:
    """OpenAI/TRL conversational: ``messages`` of ``{role, content}``, optional ``tools``."""
    fields = record(value)
    turns = message_turns(listed(fields.get("messages"), "messages"), "messages")
    return split_response(turns, json_text(fields.get("tools"), "tools"), "messages.tool_calls")


def prompt_completion_row(value: Any, params: IngestParams) -> dict[str, Any]:
    """TRL prompt-completion: ``prompt`` and ``completion``, each a string (a user turn, the
    response) or a list of messages (conversational)."""
    fields = record(value)
    turns = _part(fields.get("prompt"), "prompt", "user") + _part(
        fields.get("completion"), "completion", "assistant"
    )
    return split_response(turns, json_text(fields.get("tools"), "tools"), "completion.tool_calls")


def _part(value: Any, field: str, role: str) -> list[Turn]:
    if isinstance(value, list):
        return message_turns(value, field)
    return [{"role": role, "content": text(value, field)}]


def message_turns(messages: list[Any], field: str) -> list[Turn]:
    """Canonical turns of OpenAI messages. An assistant message with ``tool_calls`` becomes a
    ``tool_call`` turn (content: the calls as JSON), preceded by its text if it has any."""
    turns: list[Turn] = []
    for message in messages:
        turns += _message_turns(message, field)
    return turns


def _message_turns(message: Any, field: str) -> list[Turn]:
    if not isinstance(message, dict):
        raise RowReject(f"wrong_type:{field}")
    name = text(message.get("role"), f"{field}.role")
    role = MESSAGE_ROLES.get(name)
    if role is None:
        raise unknown_role(name)
    calls = (
        _tool_calls(message.get("tool_calls"), f"{field}.tool_calls")
        if role == "assistant"
        else None
    )
    content = _content(message.get("content"), f"{field}.content", required=calls is None)
    turns = [] if calls is not None and not content else [{"role": role, "content": content or ""}]
    if calls is not None:
        turns.append({"role": "tool_call", "content": calls})
    return turns


def _tool_calls(value: Any, field: str) -> str | None:
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, str):
        return text(value, field)
    if isinstance(value, list):
        return dump_json(value, field)
    raise RowReject(f"wrong_type:{field}")


def _content(value: Any, field: str, *, required: bool) -> str | None:
    """Message content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, list):
        return "".join(_text_part(part, field) for part in value)
    return text(value, field) if required else optional_text(value, field)


def _text_part(part: Any, field: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text":
        raise RowReject(f"wrong_type:{field}")
    return text(part.get("text"), field)
