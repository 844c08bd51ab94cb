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


Kind = Literal["chat", "text", "preference"]


class ChatSample(BaseModel):
    """One training record in one of three forms, never mixed.

    - chat: ``messages`` (system?, then user/assistant alternating, ending with assistant);
    - text: ``text``, a plain document for continued pre-training;
    - preference: ``messages`` is the prompt (ending with a user turn) and ``chosen`` /
      ``rejected`` are the two assistant replies to it (DPO/ORPO pairs).
    """

    model_config = ConfigDict(extra="forbid")
    id: str
    messages: list[Message] = Field(default_factory=list)
    text: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    source: Source | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_form(self) -> "ChatSample":
        if self.messages and self.text is not None:
            raise ValueError("a record holds either messages or text, not both")
        if (self.chosen is None) != (self.rejected is None):
            raise ValueError("a preference record needs both chosen and rejected")
        if self.chosen is not None:
            if self.text is not None or not self.messages:
                raise ValueError("a preference record needs prompt messages and no text")
            if self.messages[-1].role != "user":
                raise ValueError("a preference prompt must end with a user turn")
            if not self.chosen.strip() or not (self.rejected or "").strip():
                raise ValueError("chosen and rejected must be non-empty")
        if not self.messages and not (self.text or "").strip():
            raise ValueError("a record needs non-empty messages or text")
        return self

    @property
    def kind(self) -> Kind:
        if self.chosen is not None:
            return "preference"
        return "chat" if self.messages else "text"

    def texts(self) -> list[str]:
        """Every piece of free text in the record, in order (PII and repair act on these)."""
        if not self.messages:
            return [self.text or ""]
        out = [m.content for m in self.messages]
        if self.chosen is not None:
            out += [self.chosen, self.rejected or ""]
        return out

    def with_texts(self, texts: list[str]) -> "ChatSample":
        """A copy with its free text replaced, piece by piece (see ``texts``)."""
        if not self.messages:
            return self.model_copy(update={"text": texts[0]})
        if len(texts) != len(self.texts()):
            raise ValueError("one text per piece of ChatSample.texts() expected")
        n = len(self.messages)
        msgs = [Message(role=m.role, content=t) for m, t in zip(self.messages, texts[:n])]
        update: dict[str, Any] = {"messages": msgs}
        if self.chosen is not None:
            update |= {"chosen": texts[n], "rejected": texts[n + 1]}
        return self.model_copy(update=update)

    def conversation(self) -> list[Message]:
        """The record as a chat for SFT and evaluation: a preference pair gives prompt + chosen."""
        if self.chosen is not None:
            return [*self.messages, Message(role="assistant", content=self.chosen)]
        return list(self.messages)

    def joined_text(self) -> str:
        """The record as one string, for filters, hashing and dedup."""
        if not self.messages:
            return self.text or ""
        out = "\n".join(f"{m.role}: {m.content}" for m in self.messages)
        if self.chosen is not None:
            out += f"\nchosen: {self.chosen}\nrejected: {self.rejected}"
        return out


def content_id(messages: list[dict[str, str]] | None, text: str | None,
               pair: tuple[str, str] | None = None) -> str:
    """A stable id from content alone: the same conversation always gets the same id."""
    body: dict[str, Any] = {"m": messages, "t": text}
    if pair is not None:
        body["p"] = list(pair)
    payload = json.dumps(body, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _need_str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise RecordError(where, f"is {kind}")
    return value


def _validate_turns(messages: list[dict[str, str]], field: str, last: str = "assistant") -> None:
    """System first if present, then user/assistant alternating from user, ending with ``last``."""
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
    if turns[-1]["role"] != last:
        raise RecordError(field, f"must end with {'an' if last == 'assistant' else 'a'} {last} turn")
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise RecordError(f"{field}[{i}].content", "is an empty assistant turn")


def _parse_openai(items: Any, field: str = "messages") -> list[dict[str, str]]:
    if not isinstance(items, list) or not items:
        raise RecordError(field, "must be a non-empty list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecordError(f"{field}[{i}]", "must be an object")
        role = _need_str(item, "role", f"{field}[{i}].role")
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"{field}[{i}].role", f"unknown role '{role}'")
        out.append({"role": role, "content": _need_str(item, "content", f"{field}[{i}].content")})
    return out


def _reply(value: Any, field: str) -> tuple[list[dict[str, str]], str]:
    """A preference reply: a string, or a message list whose last turn is the assistant reply.

    Returns the turns before the reply (a conversational pair may repeat the prompt in
    ``chosen``/``rejected``: trl's implicit-prompt form) and the reply text.
    """
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(field, "is empty")
        return [], value
    if not isinstance(value, list):
        kind = "missing" if value is None else f"a {type(value).__name__}"
        raise RecordError(field, f"is {kind}, not a string or a message list")
    msgs = _parse_openai(value, field)
    if msgs[-1]["role"] != "assistant":
        raise RecordError(f"{field}[{len(msgs) - 1}].role", "the reply must be an assistant turn")
    if not msgs[-1]["content"].strip():
        raise RecordError(f"{field}[{len(msgs) - 1}].content", "is an empty assistant turn")
    return msgs[:-1], msgs[-1]["content"]


def _parse_preference(obj: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    """prompt/chosen/rejected (strings or messages), or chosen/rejected full conversations."""
    head_c, chosen = _reply(obj.get("chosen"), "chosen")
    head_r, rejected = _reply(obj.get("rejected"), "rejected")
    prompt = obj.get("prompt")
    if prompt is None:
        if not head_c:
            raise RecordError("prompt", "is missing (and chosen holds no prompt turns)")
        if head_c != head_r:
            raise RecordError("rejected", "its prompt turns differ from those of chosen")
        messages = head_c
    else:
        if head_c or head_r:
            raise RecordError("chosen", "holds prompt turns although 'prompt' is given")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RecordError("prompt", "is empty")
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = _parse_openai(prompt, "prompt")
    system = obj.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    _validate_turns(messages, "prompt", last="user")
    return messages, chosen, rejected


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
    """Name the input form of one raw record: preference, messages, sharegpt, alpaca or text."""
    if obj.get("chosen") is not None or obj.get("rejected") is not None:
        return "preference"
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
        "'instruction'/'output', 'prompt'/'chosen'/'rejected' or 'text'",
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
    pair: tuple[str, str] | None = None
    if form == "preference":
        messages, chosen, rejected = _parse_preference(obj)
        pair = (chosen, rejected)
    elif form == "messages":
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
        rid = content_id(messages, text, pair)
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        rid = str(raw_id)
    else:
        raise RecordError("id", f"must be a string or integer, got {type(raw_id).__name__}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    meta = {**meta, "format": meta.get("format", form)}
    chosen, rejected = pair if pair else (None, None)
    return ChatSample(id=rid, messages=messages or [], text=text, chosen=chosen,
                      rejected=rejected, source=source, meta=meta)
