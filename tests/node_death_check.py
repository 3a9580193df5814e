"""Run as a script (argv: a scratch folder, the expected token ids as JSON): a 2-node Ray
cluster on this machine, joined through `address`, one pipeline stage placed on each node by
node id, and the worker node killed outright
(its raylet and every process on it) mid-generation. Prints PASS when the planner re-placed
the model on the node left and every output is unchanged; then, with a cluster file whose
devices fit the model only together, that losing one fails the requests with a clear error
instead of hanging."""

import json
import sys
import threading
import time
from pathlib import Path

import yaml
from ray.cluster_utils import Cluster

from shardwise import LLM, SamplingParams
from shardwise.errors import ShardwiseError
from shardwise.model.registry import DEFAULT_MODEL, resolve
from shardwise.model.weights import open_weights
from shardwise.perf.memory import stage_bytes
from shardwise.planner.plan import DEFAULT_KV_TOKENS, Plan

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time", "1, 2, 3, 4,"]
PARAMS = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True)] * 2


def kill_when_generating(llm: LLM, cluster: Cluster, node, tokens: int) -> threading.Thread:
    """Kill `node` once the running sequences hold `tokens` generated tokens."""
    def run() -> None:
        while sum(len(s.output.token_ids) for g in llm.scheduler.groups for s in g) < tokens:
            time.sleep(0.05)
        cluster.remove_node(node, allow_graceful=False)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def replanned_without_the_dead_node(cluster: Cluster, expected: list[list[int]]) -> bool:
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    head = cluster.head_node.node_id
    plan = Plan.from_dict({"stages": [{"layers": [0, 15], "placement": head},
                                      {"layers": [15, 30], "placement": worker.node_id}]})
    llm = LLM(plan=plan, address=cluster.address, dtype="float32", spare_stages=True)
    try:
        placed = [s["node"] for s in llm.stages()]
        killer = kill_when_generating(llm, cluster, worker, tokens=16)
        started = time.perf_counter()
        got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
        killer.join()
        stages = llm.stages()
        print(f"replanned: {time.perf_counter() - started:.1f} s, recoveries={llm.scheduler.recoveries}, "
              f"stages={[(s['layers'], s['node'][:8]) for s in stages]}")
    finally:
        llm.close()
    return (placed == [head, worker.node_id] and got == expected and llm.scheduler.recoveries == 1
            and all(s["node"] == head for s in stages) and stages[0]["layers"][0] == 0
            and stages[-1]["layers"][1] == 30)


def fails_clearly_when_nothing_fits(cluster: Cluster, tmp: Path) -> bool:
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    whole = stage_bytes(open_weights(resolve(DEFAULT_MODEL)).spec, (0, 30), "float32", DEFAULT_KV_TOKENS)
    each = 0.7 * whole / 1e9  # GB: the model fits on the two devices together, on neither alone
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump({"devices": [
        {"name": "head", "type": "x86-cpu", "memory_gb": each, "node": cluster.head_node.node_id},
        {"name": "worker", "type": "x86-cpu", "memory_gb": each, "node": worker.node_id}]}))
    llm = LLM(cluster=str(path), address=cluster.address, dtype="float32")
    try:
        print(f"planned: {[(s['layers'], s['node'][:8]) for s in llm.stages()]}")
        kill_when_generating(llm, cluster, worker, tokens=8)
        errors = []
        for _ in range(2):  # the request that saw the death, and a new one after it
            try:
                llm.generate(PROMPTS, PARAMS)
            except ShardwiseError as e:
                errors.append(str(e))
        print(f"errors: {errors}")
    finally:
        llm.close()
    return len(errors) == 2 and all("no longer fits" in e and "GB" in e for e in errors)


if __name__ == "__main__":
    # Ray's health checks notice a vanished node in ~1.5 s here instead of its default ~15 s
    checks = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": checks})
    try:
        ok = (replanned_without_the_dead_node(cluster, json.loads(sys.argv[2]))
              and fails_clearly_when_nothing_fits(cluster, Path(sys.argv[1])))
    finally:
        cluster.shutdown()
    print("PASS" if ok else "FAIL")
