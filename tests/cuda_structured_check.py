"""A device check, not a test (pytest does not collect it): structured output on the engine's
CUDA path. A small random Llama with the default model's tokenizer (`--tokenizer DIR`) is built
here, so only the grammar keeps its output valid; then free and constrained sequences decode in
one batch on --device, and decode tokens/s at batch 32 is timed with and without a JSON schema.

    python tests/cuda_structured_check.py --tokenizer DIR [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from shardwise import LLM, SamplingParams
from shardwise.engine.structured import Constraint

SCHEMA = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}
LONG = {"type": "object", "required": ["xs"], "properties": {"xs": {"type": "array", "items": {"type": "string"},
                                                                     "minItems": 500}}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    model = Path(tempfile.mkdtemp()) / "random-llama"
    config = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(model)
    for f in Path(args.tokenizer).iterdir():
        shutil.copy(f, model)
    llm = LLM(str(model), device=args.device)
    rules = [None, Constraint.json(SCHEMA), Constraint.regex(r"[0-9]{3}-[0-9]{4}"), Constraint.choice(["yes", "no"]),
             Constraint.json()]
    params = [SamplingParams(max_tokens=48, temperature=1.0, seed=i, constraint=c) for i, c in enumerate(rules)]
    outs = llm.generate(["Hello"] * len(rules), params)
    for c, out in zip(rules, outs, strict=True):
        print(f"{c.kind if c else 'free':<12} {out.finish_reason:<7} {out.text[:90]!r}")
    assert outs[1].finish_reason == "stop"
    person = json.loads(outs[1].text)
    assert set(person) == {"name", "age"} and 0 <= person["age"] <= 150 and len(person["name"]) <= 12
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", outs[2].text) and outs[3].text in ("yes", "no")
    assert outs[4].text.startswith("{")

    def rate(constraint) -> float:
        batch = [SamplingParams(max_tokens=64, temperature=1.0, seed=i, ignore_eos=True, constraint=constraint)
                 for i in range(32)]
        started = time.perf_counter()
        outs = llm.generate(["Hello"] * 32, batch)
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - started)

    rate(None), rate(Constraint.json(LONG))  # warm up
    free, constrained = [], []
    for _ in range(5):
        free.append(rate(None))
        constrained.append(rate(Constraint.json(LONG)))
    f, c = statistics.median(free), statistics.median(constrained)
    print(f"batch 32 on {args.device}: free {f:.0f} tok/s, JSON schema {c:.0f} tok/s, ratio {c / f:.2f}x")
    print("structured output on", args.device, "OK")


if __name__ == "__main__":
    main()
