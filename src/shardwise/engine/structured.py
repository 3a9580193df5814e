"""Structured output: the grammar a sequence's tokens must follow, enforced by a token mask
before each draw at the last worker.

Built on xgrammar, chosen by measurement (benchmarks/grammar_libraries.py, the default
model's tokenizer): its masks cost 3-7x less than llguidance's and 4-25x less than
outlines-core's per step at batch 1 and 32, and it compiles a schema in milliseconds
(cached per process); it also knows the tool-call formats of the common model families.

A Constraint is plain data that travels in SamplingParams to whichever process samples;
Grammars compiles constraints for one model's tokenizer, once per process; a
SequenceGrammar follows one sequence, and is rebuilt from its tokens wherever the sequence
goes (after a lost stage, or moved with its KV), since a matcher cannot be pickled.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from shardwise.errors import ShardwiseError

Kind = Literal["json", "json_schema", "regex", "choice", "grammar", "structural_tag"]
# Longer constraints are refused: compile time grows faster than their length (a 45 KB schema of
# flat properties took 10 s here), and a pipeline's last stage compiles one as the sequence joins.
MAX_SOURCE_CHARS = 32768


@dataclass(frozen=True)
class Constraint:
    """What a sequence's output must match. source: the JSON schema (JSON text), the regex, the
    choices (a JSON list), the EBNF grammar (xgrammar's dialect, GBNF-like, rule `root`), or an
    xgrammar structural tag (JSON). strict: a schema's objects take no properties it does not list."""

    kind: Kind
    source: str = ""
    strict: bool = True

    @classmethod
    def json(cls, schema: dict[str, Any] | None = None, strict: bool = True) -> Constraint:
        """Valid JSON matching `schema`, or any JSON object without one."""
        return cls("json") if schema is None else cls("json_schema", json.dumps(schema), strict)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> Constraint:
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def grammar(cls, ebnf: str) -> Constraint:
        return cls("grammar", ebnf)


def _reason(e: Exception) -> str:
    """xgrammar's message without its time stamp and C++ source position."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip()).strip()


class Grammars:
    """Compiles constraints for one model's tokenizer (loaded on first use). Pickles as its
    arguments, so a sampler that moves to another process finds that process's Grammars."""

    def __init__(self, tokenizer_path: Path, vocab_size: int, stop_ids: tuple[int, ...]):
        self.tokenizer_path, self.vocab_size, self.stop_ids = Path(tokenizer_path), vocab_size, stop_ids

    def __reduce__(self):
        return grammars_for, (self.tokenizer_path, self.vocab_size, self.stop_ids)

    @functools.cached_property
    def compiler(self):
        import xgrammar as xgr

        from shardwise.model.tokenizer import Tokenizer

        tokenizer = Tokenizer(self.tokenizer_path, set(self.stop_ids))
        try:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer.hf, vocab_size=self.vocab_size,
                                                      stop_token_ids=sorted(tokenizer.eos_token_ids))
        except Exception as e:
            raise ShardwiseError(f"structured output cannot use this model's tokenizer ({_reason(e)})") from None
        return xgr.GrammarCompiler(info)

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one Grammars per model and process: see grammars_for)
    def compile(self, constraint: Constraint):
        """The compiled grammar; a ShardwiseError naming the problem if the constraint is invalid."""
        compiler, source = self.compiler, constraint.source
        if len(source) > MAX_SOURCE_CHARS:
            raise ShardwiseError(f"the {constraint.kind.replace('_', ' ')} is {len(source)} characters long, more "
                                 f"than the {MAX_SOURCE_CHARS} allowed: simplify it")
        try:
            match constraint.kind:
                case "json":
                    return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
                case "json_schema":
                    # one-line JSON: free whitespace lets a small model emit newlines forever
                    return compiler.compile_json_schema(source, any_whitespace=False, strict_mode=constraint.strict)
                case "regex":
                    return compiler.compile_regex(source)
                case "choice":
                    options = json.loads(source)
                    return compiler.compile_grammar("root ::= " + " | ".join(_ebnf_string(o) for o in options))
                case "grammar":
                    return compiler.compile_grammar(source)
                case "structural_tag":
                    return compiler.compile_structural_tag(source)
        except ShardwiseError:
            raise
        except Exception as e:
            raise ShardwiseError(f"invalid {constraint.kind.replace('_', ' ')}: {_reason(e)}") from None
        raise ShardwiseError(f"unknown constraint kind '{constraint.kind}'")

    def follow(self, constraint: Constraint, tokens: list[int] = ()) -> SequenceGrammar:
        self.compile(constraint)  # fails here, at add, if invalid
        return SequenceGrammar(self, constraint, tokens)


@functools.cache
def grammars_for(tokenizer_path: Path, vocab_size: int, stop_ids: tuple[int, ...]) -> Grammars:
    return Grammars(tokenizer_path, vocab_size, stop_ids)


_EBNF_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def model_grammars(path: Path, weights) -> Grammars:
    """The Grammars of the model at `path`, opened as `weights`."""
    return grammars_for(Path(path), weights.spec.vocab_size, tuple(sorted(weights.eos_token_ids())))


def _ebnf_string(text: str) -> str:
    if not text:
        raise ShardwiseError("a choice is empty: give non-empty strings")
    return f'"{text.translate(_EBNF_ESCAPES)}"'


class SequenceGrammar:
    """The grammar state of one sequence: the tokens it accepted, and a matcher rebuilt from them
    on first use in a process."""

    def __init__(self, grammars: Grammars, constraint: Constraint, tokens: list[int] = ()):
        self.grammars, self.constraint, self.tokens = grammars, constraint, list(tokens)
        self._matcher = None

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_matcher": None}

    @property
    def matcher(self):
        if self._matcher is None:
            import xgrammar as xgr

            matcher = xgr.GrammarMatcher(self.grammars.compile(self.constraint))
            for token in self.tokens:
                if not matcher.accept_token(token):
                    raise ShardwiseError(f"token {token} does not follow this sequence's grammar")
            self._matcher = matcher
        return self._matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into bitmask[row]. Once the grammar has ended (its stop
        token drawn, e.g. under ignore_eos) only stop tokens are allowed."""
        if self.matcher.is_terminated():
            words = bitmask[row].numpy().view(np.uint32)  # (the same memory, bits unsigned)
            words[:] = 0
            for stop in self.matcher.stop_token_ids:
                words[stop // 32] |= np.uint32(1 << stop % 32)
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        if self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token):
            raise ShardwiseError(f"token {token} does not follow this sequence's grammar")
        self.tokens.append(token)


def allocate_masks(rows: int, vocab_size: int) -> torch.Tensor:
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab_size)


def apply_masks(logits: torch.Tensor, masks: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place, the logits of tokens the masks forbid, in these rows."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, masks.to(logits.device, non_blocking=True), indices=rows)
