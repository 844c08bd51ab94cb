"""The one record form every stage reads and writes, and the parsers from each input form."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["system", "user", "assistant"]

# ShareGPT speakers (both key schemes) mapped onto our three roles.
SHAREGPT_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}


class RecordError(ValueError):
    """A record that cannot be parsed; names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.message = message


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    line: int


class ChatSample(BaseModel):
    """A chat conversation (``messages``) or a plain-text document (``text``), never both."""

    model_config = ConfigDict(extra="forbid")
    id: str
    messages: list[Message] = Field(default_factory=list)
    text: str | None = None
    source: Source | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_form(self) -> "ChatSample":
        if self.messages and self.text is not None:
            raise ValueError("a record holds either messages or text, not both")
        if not self.messages and not (self.text or "").strip():
            raise ValueError("a record needs non-empty messages or text")
        return self

    @property
    def kind(self) -> Literal["chat", "text"]:
        return "chat" if self.messages else "text"

    def texts(self) -> list[str]:
        """Every piece of free text in the record, in order."""
        return [m.content for m in self.messages] if self.messages else [self.text or ""]

    def with_texts(self, texts: list[str]) -> "ChatSample":
        """A copy with its free text replaced, piece by piece (see ``texts``)."""
        if self.messages:
            if len(texts) != len(self.messages):
                raise ValueError("one text per message expected")
            msgs = [Message(role=m.role, content=t) for m, t in zip(self.messages, texts)]
            return self.model_copy(update={"messages": msgs})
        return self.model_copy(update={"text": texts[0]})

    def joined_text(self) -> str:
        """The conversation as one string, for filters, hashing and dedup."""
        if self.messages:
            return "\n".join(f"{m.role}: {m.content}" for m in self.messages)
        return self.text or ""


def content_id(messages: list[dict[str, str]] | None, text: str | None) -> str:
    """A stable id from content alone: the same conversation always gets the same id."""
    payload = json.dumps({"m": messages, "t": text}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _need_str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise RecordError(where, f"is {kind}")
    return value


def _validate_turns(messages: list[dict[str, str]], field: str) -> None:
    """System first if present, then user/assistant alternating from user, ending with assistant."""
    turns = messages
    if turns and turns[0]["role"] == "system":
        turns = turns[1:]
    if not turns:
        raise RecordError(field, "has no user/assistant turns")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            offset = len(messages) - len(turns)
            raise RecordError(
                f"{field}[{i + offset}].role",
                f"is '{msg['role']}' where '{expected}' was expected "
                "(system first, then user/assistant alternating)",
            )
    if turns[-1]["role"] != "assistant":
        raise RecordError(field, "must end with an assistant turn")
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise RecordError(f"{field}[{i}].content", "is an empty assistant turn")


def _parse_openai(items: Any) -> list[dict[str, str]]:
    if not isinstance(items, list) or not items:
        raise RecordError("messages", "must be a non-empty list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecordError(f"messages[{i}]", "must be an object")
        role = _need_str(item, "role", f"messages[{i}].role")
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"messages[{i}].role", f"unknown role '{role}'")
        out.append({"role": role, "content": _need_str(item, "content", f"messages[{i}].content")})
    return out


def _parse_sharegpt(items: Any) -> list[dict[str, str]]:
    if not isinstance(items, list) or not items:
        raise RecordError("conversations", "must be a non-empty list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecordError(f"conversations[{i}]", "must be an object")
        speaker_key, text_key = ("from", "value") if "from" in item else ("role", "content")
        speaker = _need_str(item, speaker_key, f"conversations[{i}].{speaker_key}")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise RecordError(f"conversations[{i}].{speaker_key}", f"unknown speaker '{speaker}'")
        text = _need_str(item, text_key, f"conversations[{i}].{text_key}")
        out.append({"role": role, "content": text})
    return out


def _parse_alpaca(obj: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _need_str(obj, "instruction", "instruction")
    extra = obj.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError("input", f"is a {type(extra).__name__}, not a string")
    output = _need_str(obj, "output", "output")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs = []
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        msgs.append({"role": "system", "content": obj["system"]})
    msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return msgs


def detect_format(obj: dict[str, Any]) -> str:
    """Name the input form of one raw record: messages, sharegpt, alpaca or text."""
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    keys = ", ".join(sorted(obj)) or "none"
    raise RecordError(
        "<record>",
        f"unrecognised form (keys: {keys}); expected 'messages', 'conversations', "
        "'instruction'/'output' or 'text'",
    )


def parse_record(obj: Any, source: Source | None = None) -> ChatSample:
    """Parse one raw record in any supported form into a ChatSample, or raise RecordError."""
    if isinstance(obj, ChatSample):
        return obj
    if not isinstance(obj, dict):
        raise RecordError("<record>", f"must be a JSON object, got {type(obj).__name__}")
    form = detect_format(obj)
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    if form == "messages":
        messages = _parse_openai(obj["messages"])
        _validate_turns(messages, "messages")
    elif form == "sharegpt":
        messages = _parse_sharegpt(obj["conversations"])
        _validate_turns(messages, "conversations")
    elif form == "alpaca":
        messages = _parse_alpaca(obj)
    else:
        text = _need_str(obj, "text", "text")
        if not text.strip():
            raise RecordError("text", "is empty")
    raw_id = obj.get("id")
    if raw_id is None or raw_id == "":
        rid = content_id(messages, text)
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        rid = str(raw_id)
    else:
        raise RecordError("id", f"must be a string or integer, got {type(raw_id).__name__}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    meta = {**meta, "format": meta.get("format", form)}
    return ChatSample(id=rid, messages=messages or [], text=text, source=source, meta=meta)
