"""Run as a script: a 2-node Ray cluster on this machine, a plan placing one stage on each
node by node id, joined through `address`. Prints PASS when placement and output are right."""

import sys

from ray.cluster_utils import Cluster

from shardwise import LLM, SamplingParams
from shardwise.cluster.plan import Plan

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
worker = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
nodes = [cluster.head_node.node_id, worker.node_id]
plan = Plan.from_dict({"stages": [{"layers": [0, 13], "placement": nodes[0]},
                                  {"layers": [13, 30], "placement": nodes[1]}]})
llm = LLM(plan=plan, address=cluster.address, dtype="float32")
try:
    placed = llm.executor.node_ids
    text = llm.generate(sys.argv[1], SamplingParams(max_tokens=12, temperature=0.0))[0].text
finally:
    llm.close()
    cluster.shutdown()
print(f"placed={placed} nodes={nodes} text={text!r}")
print("PASS" if placed == nodes and text == sys.argv[2] else "FAIL")
