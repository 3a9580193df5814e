"""Run as a script: `shardwise profile --address` on a 2-node Ray cluster on this machine.
Prints PASS when both nodes are profiled and every node pair has a measured link. The
engine steps are timed on a tiny random Llama (what is under test is the cluster's
mechanics; test_estimate profiles the real model)."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ray.cluster_utils import Cluster
from transformers import LlamaConfig, LlamaForCausalLM

model = Path(tempfile.mkdtemp()) / "tiny-llama"
LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)).save_pretrained(model)

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
out = Path(tempfile.mkdtemp()) / "cluster.json"
try:
    result = subprocess.run([sys.executable, "-m", "shardwise.cli", "profile", "--quick", "--model", str(model),
                             "--address", cluster.address, "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
finally:
    cluster.shutdown()
print(result.stdout[-3000:], result.stderr[-3000:])
data = json.loads(out.read_text()) if out.exists() else {"devices": [], "links": []}
names = [d["name"] for d in data["devices"]]
pairs = {(link["from"], link["to"]) for link in data["links"]}
ok = (len(set(names)) == 2 and all(d["bandwidth"] > 0 and d["measured"]["steps"] for d in data["devices"])
      and pairs == {(names[0], names[0]), (names[0], names[1]), (names[1], names[1])})
print(f"devices={names} links={sorted(pairs)}")
print("PASS" if ok else "FAIL")
