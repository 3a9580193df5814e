"""shardwise: predict, plan and run LLM inference across heterogeneous devices."""

from importlib import import_module
from typing import TYPE_CHECKING

# Loaded on first use: the engine pulls in torch (seconds), which `shardwise --help`, a plan or
# an estimate do not need.
_EXPORTS = {"LLM": "shardwise.llm", "RequestOutput": "shardwise.llm", "ModelSpec": "shardwise.model.spec",
            "SamplingParams": "shardwise.engine.sampling", "ShardModel": "shardwise.engine.shard",
            "ShardwiseError": "shardwise.errors"}
__all__ = ["LLM", "ModelSpec", "RequestOutput", "SamplingParams", "ShardModel", "ShardwiseError"]

if TYPE_CHECKING:
    from shardwise.engine.sampling import SamplingParams
    from shardwise.engine.shard import ShardModel
    from shardwise.errors import ShardwiseError
    from shardwise.llm import LLM, RequestOutput
    from shardwise.model.spec import ModelSpec


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'shardwise' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
