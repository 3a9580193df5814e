"""Model specs by name, for estimating and planning without weights.

A name is looked up in the catalog (catalog.yaml); a .gguf file gives its
metadata, an HF model directory or config.json its config.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec


@cache
def catalog() -> dict[str, ModelSpec]:
    entries = yaml.safe_load(resources.files("shardwise.model").joinpath("catalog.yaml").read_text())
    return {name: ModelSpec.from_dict({"dtype": "bfloat16", "name": name, **e}) for name, e in entries.items()}


def load_spec(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        from shardwise.model.weights import GGUFWeights

        return GGUFWeights(path).spec
    if path.name == "config.json" and path.is_file() or (path / "config.json").is_file():
        return ModelSpec.from_hf_config(path)
    key = model.lower().split("/")[-1].removesuffix("-hf").removesuffix("-instruct")
    if key not in catalog():
        raise ShardwiseError(
            f"unknown model '{model}': use a .gguf file, an HF config.json or model directory, "
            f"or one of {', '.join(catalog())}"
        )
    return catalog()[key]
