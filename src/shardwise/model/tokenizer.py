"""Tokenizer, chat template and incremental detokenization, via HF tokenizers.

A GGUF file carries its tokenizer in metadata; transformers converts it to a fast
tokenizer (several seconds), so the result is cached beside the model cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from shardwise.cache import cache_dir
from shardwise.errors import ShardwiseError


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


class Tokenizer:
    def __init__(self, path: Path, eos_token_ids: set[int] | None = None):
        from transformers import AutoTokenizer

        _quiet_transformers()
        if path.is_dir():
            if not any(path.glob("tokenizer*")):
                raise ShardwiseError(f"{path} has no tokenizer files (tokenizer.json or tokenizer.model with "
                                     "tokenizer_config.json): copy them from the model's original repository")
            self.hf = AutoTokenizer.from_pretrained(path)
        else:
            self.hf = AutoTokenizer.from_pretrained(_converted_gguf_tokenizer(path))
        self.eos_token_ids = set(eos_token_ids or ())
        if self.hf.eos_token_id is not None:
            self.eos_token_ids.add(self.hf.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template writes tool definitions itself."""
        return "tools" in (self.hf.chat_template or "")

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
        if not self.hf.chat_template:
            raise ShardwiseError("this model has no chat template: send a plain prompt (--no-chat)")
        _check_messages(messages)
        text = self.hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return self.hf.encode(text, add_special_tokens=False)  # the template wrote them already


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ShardwiseError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ShardwiseError(f"each message needs 'role' and 'content', got {m!r}")


def _converted_gguf_tokenizer(path: Path) -> Path:
    stat = path.stat()
    target = cache_dir() / "tokenizers" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many kinds for unknown tokenizer types
        raise ShardwiseError(f"cannot read the tokenizer in {path} ({e}); use an HF model directory") from None
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic: a half-written tokenizer is never used
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class Detokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a character,
    and holds back text that could be the start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.token_ids: list[int] = []
        self._prefix = self._read = 0  # window of ids whose text was already emitted
        self.text = ""  # all text decoded so far
        self.emitted = 0  # characters of self.text handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one token; return the new text that is safe to show."""
        self.token_ids.append(token_id)
        ids = self.token_ids
        before = self.tokenizer.decode(ids[self._prefix : self._read])
        after = self.tokenizer.decode(ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation ends."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text, self.stopped, final = self.text[:at], True, True
        end = len(self.text) if final else len(self.text) - partial_marker(self.text, self.stop)
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def partial_marker(text: str, markers: list[str]) -> int:
    """Length of the longest tail of text that begins some marker (a stop string, a tag): what
    to hold back until the next text says whether the marker follows."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best
