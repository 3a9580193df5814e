"""shardwise: predict, plan and run LLM inference across heterogeneous devices."""

from shardwise.engine.sampling import SamplingParams
from shardwise.engine.shard import ShardModel
from shardwise.errors import ShardwiseError
from shardwise.llm import LLM, RequestOutput
from shardwise.model.spec import ModelSpec

__all__ = ["LLM", "ModelSpec", "RequestOutput", "SamplingParams", "ShardModel", "ShardwiseError"]
