"""Which constrained-decoding library shardwise builds on: xgrammar, llguidance and outlines-core
side by side on the default model's tokenizer, in one run.

For each library and each JSON schema: the time to compile the schema (cold, the first request
with it pays it) and the time to compute the next-token masks per decode step, while a valid
document is fed token by token, at batch 1 and at batch 32 (32 matchers, one step's masks).
Medians over --rounds.

    pip install xgrammar llguidance outlines-core
    python benchmarks/grammar_libraries.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from shardwise.model.registry import DEFAULT_MODEL, resolve
from shardwise.model.tokenizer import Tokenizer

SCHEMAS = {
    "flat": ({"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False},
             {"city": "Paris", "population": 2102650}),
    "nested": ({"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
                "properties": {
                    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                    "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 4},
                    "address": {"type": "object", "required": ["street", "zip"], "additionalProperties": False,
                                "properties": {"street": {"type": "string"},
                                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}},
               {"name": "Ada Lovelace", "age": 36, "tags": ["admin", "user"],
                "address": {"street": "12 St James's Square", "zip": "10115"}}),
}


class Library:
    name: str

    def compile(self, schema: dict): ...
    def matcher(self, compiled): ...
    def masks(self, matchers: list) -> None: ...  # one step: every matcher's next-token mask
    def advance(self, matcher, token: int) -> None: ...


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, hf, vocab: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
        self.vocab = vocab

    def compile(self, schema):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def masks(self, matchers):
        bitmask = self.xgr.allocate_token_bitmask(len(matchers), self.vocab)
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def advance(self, matcher, token):
        assert matcher.accept_token(token), token


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, hf, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self.ll, self.llnp = llguidance, llguidance.numpy
        self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
        self.executor = llguidance.LLExecutor()
        self.vocab = vocab

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema)
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)  # compiles (lazily: most of it per token)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matcher(self, compiled):
        return self.ll.LLMatcher(self.tokenizer, compiled)

    def masks(self, matchers):
        bitmask = self.llnp.allocate_token_bitmask(len(matchers), self.vocab)
        if len(matchers) == 1:
            self.llnp.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            self.llnp.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def advance(self, matcher, token):
        assert matcher.consume_token(token), matcher.get_error()


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, hf, vocab: int):
        import outlines_core

        self.oc = outlines_core
        self.vocabulary = outlines_core.Vocabulary.from_pretrained_tokenizer(hf) if hasattr(
            outlines_core.Vocabulary, "from_pretrained_tokenizer") else self._vocabulary(hf)

    def _vocabulary(self, hf):
        eos = hf.eos_token_id
        tokens: dict[str, list[int]] = {}
        for token, i in hf.get_vocab().items():
            if i != eos and token not in hf.all_special_tokens:
                text = hf.convert_tokens_to_string([token])
                tokens.setdefault(text, []).append(i)
        return self.oc.Vocabulary(eos, tokens)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def masks(self, matchers):
        for m in matchers:
            m.get_tokens()

    def advance(self, matcher, token):
        matcher.advance(token)


def time_library(lib: Library, tokenizer: Tokenizer, schema: dict, document: dict, rounds: int) -> dict:
    tokens = tokenizer.hf.encode(json.dumps(document), add_special_tokens=False)
    compile_s, step_1, step_32 = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        compiled = lib.compile(schema)
        compile_s.append(time.perf_counter() - started)
        for batch, out in ((1, step_1), (32, step_32)):
            matchers = [lib.matcher(compiled) for _ in range(batch)]
            spent = 0.0
            for token in tokens:
                started = time.perf_counter()
                lib.masks(matchers)
                spent += time.perf_counter() - started
                for m in matchers:
                    lib.advance(m, token)
            out.append(spent / len(tokens))
    return {"compile_ms": 1e3 * statistics.median(compile_s), "mask_us_b1": 1e6 * statistics.median(step_1),
            "mask_us_b32": 1e6 * statistics.median(step_32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tokenizer = Tokenizer(resolve(DEFAULT_MODEL))
    vocab = len(tokenizer.hf)
    print(f"{DEFAULT_MODEL}: vocabulary {vocab}; medians of {args.rounds}")
    print(f"{'library':<14} {'schema':<8} {'compile ms':>11} {'mask us/step b1':>16} {'mask us/step b32':>17}"
          f"{'masks vs xgrammar b1 / b32':>29}")
    first: dict[str, dict] = {}  # the first library's results (xgrammar's), by schema: the ratios' base
    for make in (XGrammar, LLGuidance, OutlinesCore):
        try:
            lib = make(tokenizer.hf, vocab)
        except Exception as e:  # a library that is missing or cannot read this tokenizer
            print(f"{make.name:<14} unavailable: {type(e).__name__}: {e}")
            continue
        for name, (schema, document) in SCHEMAS.items():
            r = time_library(lib, tokenizer, schema, document, args.rounds)
            base = first.setdefault(name, r)
            print(f"{lib.name:<14} {name:<8} {r['compile_ms']:>11.1f} {r['mask_us_b1']:>16.0f} "
                  f"{r['mask_us_b32']:>17.0f} {r['mask_us_b1'] / base['mask_us_b1']:>19.2f}x / "
                  f"{r['mask_us_b32'] / base['mask_us_b32']:.2f}x")


if __name__ == "__main__":
    main()
