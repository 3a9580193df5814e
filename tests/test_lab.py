"""The lab: an emulated heterogeneous cluster of real Ray nodes on this machine (each in its own
network namespace and cgroup), profiled, planned over and run, then removed without a trace.

Needs root, network namespaces and cgroup v1 (CI has them); elsewhere these tests skip, saying why."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from shardwise.lab import host
from shardwise.lab.lab import STATE
from tests.conftest import cli

try:
    host.check_host()
    UNAVAILABLE = None
except host.LabUnavailable as e:
    UNAVAILABLE = str(e)
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no lab here: {UNAVAILABLE}")

# a full core and a quarter of one (a CFS quota: the slow node is fast in bursts shorter than 100 ms)
LAB = {"nodes": [{"name": "fast", "cpus": 1.0, "memory_gb": 2, "link": {"rate_mbit": 1000}},
                 {"name": "slow", "cpus": 0.25, "memory_gb": 2, "link": {"rate_mbit": 100}}]}


def leftovers() -> list[str]:
    """Whatever a lab makes that is still on this host."""
    found = [f"namespace {n}" for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                      text=True).stdout.split() if n.startswith("swlab")]
    if subprocess.run(["ip", "link", "show", host.BRIDGE], capture_output=True).returncode == 0:
        found.append(f"bridge {host.BRIDGE}")
    found += [f"cgroup {c}" for c in ("cpu", "memory") if (host.CGROUPS / c / host.GROUP).exists()]
    return found + ([f"state {STATE}"] if STATE.exists() else [])


def test_without_a_lab_down_says_so():
    if STATE.exists():
        pytest.skip("a lab is up")
    result = cli("lab", "down")
    assert result.returncode == 0 and "no lab was up" in result.stdout


def test_down_sweeps_what_an_up_killed_midway_left_without_its_state():
    if STATE.exists():
        pytest.skip("a lab is up")
    subprocess.run(["ip", "netns", "add", "swlab-ghost"], check=True)
    (host.CGROUPS / "cpu" / host.GROUP / "ghost").mkdir(parents=True)
    result = cli("lab", "down")
    assert result.returncode == 0 and "is down" in result.stdout, result.stderr
    assert leftovers() == []


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    path = tmp_path_factory.mktemp("lab") / "lab.yaml"
    path.write_text(yaml.safe_dump(LAB))
    up = cli("lab", "up", str(path))
    try:
        assert up.returncode == 0, up.stderr
        yield up.stdout.split("lab up at ")[1].split(":")[0] + ":6390"
    finally:
        down = cli("lab", "down")
        assert down.returncode == 0 and "is down" in down.stdout, down.stderr
        assert leftovers() == []


def test_a_bad_lab_file_is_one_line_and_starts_nothing(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"name": "Pi 4", "cpus": 0, "memory_gb": 1}]}))
    result = cli("lab", "up", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "nodes.0.name" in result.stderr and "nodes.0.cpus" in result.stderr
    assert not STATE.exists()


def tiny_llama(path: Path) -> Path:
    """A small random Llama: what the profile times is the nodes' speed, not this model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    return path


def test_the_profile_sees_the_quota_and_the_plan_leaves_the_slow_node_out(lab, tmp_path):
    """profile --address measures each node's sustained speed (the quarter-core node far slower,
    though a burst shorter than the CFS period runs it at full speed) and writes a cluster file;
    the latency plan over it keeps every layer on the fast node; the lab runs that plan."""
    out = tmp_path / "lab.json"
    profiled = cli("profile", "--quick", "--model", str(tiny_llama(tmp_path / "tiny")), "--address", lab,
                   "--out", str(out), timeout=900)
    assert profiled.returncode == 0, profiled.stderr
    profile = json.loads(out.read_text())
    devices = {d["name"]: d for d in profile["devices"]}
    assert set(devices) == {"fast", "slow"}  # (the head coordinates: it offers no CPU, so it is not profiled)
    links = {(link["from"], link["to"]): link for link in profile["links"]}
    assert set(links) in ({("fast", "fast"), ("fast", "slow"), ("slow", "slow")},
                          {("slow", "slow"), ("slow", "fast"), ("fast", "fast")})
    crossing = links.get(("fast", "slow")) or links[("slow", "fast")]
    assert crossing["bandwidth"] < 100e6 / 8  # the slow node's 100 Mbit/s link, shaped
    assert crossing["bandwidth"] < links[("fast", "fast")]["bandwidth"] / 5
    fast, slow = devices["fast"], devices["slow"]
    assert slow["flops"]["fp32"] < 0.5 * fast["flops"]["fp32"]
    assert slow["memory_bytes"] == pytest.approx(2e9)  # what the node offers, not the host's RAM
    cluster = tmp_path / "lab-cluster.yaml"
    nodes = {d["name"]: d["node"] for d in yaml.safe_load(cluster.read_text())["devices"]}
    assert nodes == {"fast": "10.213.0.10", "slow": "10.213.0.11"}

    plan = tmp_path / "plan.json"
    planned = cli("plan", "--model", "smollm2-135m", "--cluster", str(cluster), "--objective", "latency",
                  "--out", str(plan))
    assert planned.returncode == 0, planned.stderr
    stages = json.loads(plan.read_text())["stages"]
    assert [s["placement"] for s in stages] == ["10.213.0.10"], planned.stdout

    ran = cli("generate", "What is the capital of France?", "--max-tokens", "12", "--dtype", "int4",
              "--cluster", str(cluster), "--address", lab, timeout=600)
    assert ran.returncode == 0, ran.stderr
    assert "Paris" in ran.stdout


def test_a_node_share_changes_while_it_runs(lab):
    assert cli("lab", "set", "slow", "--cpus", "0.5").returncode == 0
    quota = (host.CGROUPS / "cpu" / host.GROUP / "slow" / "cpu.cfs_quota_us").read_text()
    assert int(quota) == host.CFS_PERIOD_US // 2
    wrong = cli("lab", "set", "nowhere", "--cpus", "1")
    assert wrong.returncode == 1 and "no node 'nowhere'" in wrong.stderr

