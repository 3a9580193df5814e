"""A lab file: the nodes of an emulated cluster on one Linux machine, each a CPU share, a memory
cap and a link.

    nodes:
      - name: fast
        cpus: 1.0                  # CPU time, in cores (a CFS quota: 0.25 = a quarter of one core)
        memory_gb: 2               # memory the node offers shardwise (what Ray and the planner see)
        link: {rate_mbit: 1000}    # its link to the others (token-bucket shaped, both ways)
      - name: pi
        cpus: 0.25
        memory_gb: 0.4
        link: {rate_mbit: 20, delay_ms: 5}   # delay where the kernel has netem
    runtime_gb: 1.5                # optional: memory for each node's Ray daemons and Python on top
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shardwise.errors import ShardwiseError

MAX_NODES = 200  # one /24 subnet, the head at .1


class Link(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate_mbit: float = Field(gt=0, description="the link's rate in Mbit/s, each way")
    delay_ms: float = Field(0.0, ge=0, description="one-way delay (needs the kernel's netem qdisc)")


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    cpus: float = Field(gt=0, le=1024, description="CPU time in cores")
    memory_gb: float = Field(gt=0)
    link: Link = Link(rate_mbit=10_000)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,23}", name):
            raise ValueError("use 1-24 lower-case letters, digits and '-', starting with a letter")
        return name


class LabSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nodes: list[Node] = Field(min_length=1, max_length=MAX_NODES)
    runtime_gb: float = Field(1.5, ge=0.5, description="memory each node's Ray daemons and Python need on top")

    @field_validator("nodes")
    @classmethod
    def _unique(cls, nodes: list[Node]) -> list[Node]:
        names = [n.name for n in nodes]
        if len(set(names)) < len(names) or "head" in names:
            raise ValueError("node names must be unique and not 'head' (the lab's head node)")
        return nodes

    @classmethod
    def load(cls, path: str | Path) -> LabSpec:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ShardwiseError(f"cannot read the lab file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ShardwiseError(f"the lab file {path} is not valid YAML: {e}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}" for err in e.errors())
            raise ShardwiseError(f"the lab file {path} is not a lab: {problems} "
                                 "(see `shardwise lab up --help`)") from None
