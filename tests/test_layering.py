"""The floors hold: no module imports from a part it must not know (lazy imports included).

Bottom to top: kernels, quant, model; engine (one process) beside perf (prediction) and planner
(decision, over perf); cluster (Ray); the facade llm.py; serve and collab; the CLI. The rules
below are DESIGN.md's, written down where a change that breaks one fails its tests."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src"

PARTS = {  # the longest matching prefix names a module's part
    "shardwise/kernels/": "kernels", "shardwise/quant/": "quant", "shardwise/model/": "model",
    "shardwise/engine/": "engine", "shardwise/perf/": "perf", "shardwise/perf/profile.py": "profile",
    "shardwise/perf/cluster_profile.py": "profile", "shardwise/planner/": "planner", "shardwise/cluster/": "cluster",
    "shardwise/llm.py": "facade", "shardwise/serve/": "serve", "shardwise/collab/": "collab",
    "shardwise/cli.py": "cli", "shardwise/lab/": "lab",
}
NEVER = {  # part -> the parts it must not import, and why
    "kernels": ({"quant", "model", "engine", "perf", "planner", "cluster", "facade", "serve", "collab", "cli"},
                "kernels are the ground floor"),
    "quant": ({"engine", "perf", "planner", "cluster", "facade", "serve", "collab", "cli"},
              "a weight format knows no engine"),
    "model": ({"engine", "perf", "planner", "cluster", "facade", "serve", "collab", "cli"},
              "a model description knows nothing of execution"),
    "engine": ({"perf", "profile", "planner", "cluster", "facade", "serve", "collab", "cli"},
               "a shard runs the same with or without Ray, a planner or HTTP"),
    "perf": ({"engine", "planner", "cluster", "facade", "serve", "collab", "cli"},
             "prediction needs no weights and decides nothing"),
    "planner": ({"engine", "cluster", "facade", "serve", "collab", "cli"}, "a plan is data; the cluster runs it"),
    "cluster": ({"facade", "serve", "collab", "cli"}, "the pipeline knows no facade and no HTTP"),
    "facade": ({"serve", "collab", "cli"}, "the facade is below its faces"),
    "collab": ({"serve", "cli"}, "the collaborative client is below the server"),
    "serve": ({"cli"}, "no CLI below the top"),
    "lab": ({"kernels", "quant", "model", "engine", "perf", "profile", "planner", "cluster", "facade", "serve",
             "collab", "cli"}, "the lab makes machines to run on; it knows nothing of what runs"),
}


def part(path: str) -> str | None:
    matches = [prefix for prefix in PARTS if path.startswith(prefix)]
    return PARTS[max(matches, key=len)] if matches else None


def imported_modules(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every shardwise import, lazy ones too; type-checking ones are not imports."""
    guards = [node for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    typing_only = {line for guard in guards for sub in guard.body
                   for line in range(sub.lineno, (sub.end_lineno or sub.lineno) + 1)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m.startswith("shardwise.") and line not in typing_only]


def module_path(src: Path, module: str) -> str | None:
    base = src / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return str(candidate.relative_to(src))
    return None


def broken_rules(src: Path = SRC) -> list[str]:
    broken = []
    for file in sorted(src.rglob("*.py")):
        here = str(file.relative_to(src))
        mine = part(here)
        if mine not in NEVER:
            continue
        forbidden, why = NEVER[mine]
        for line, module in imported_modules(ast.parse(file.read_text())):
            target = module_path(src, module)
            theirs = part(target) if target else None
            if theirs in forbidden and theirs != mine:
                broken.append(f"{here}:{line} ({mine}) imports {module} ({theirs}): {why}")
    return broken


def test_no_floor_imports_a_floor_above_it():
    assert broken_rules() == []


def test_the_rules_see_a_broken_import(tmp_path):
    """The check itself can fail: a model module importing the engine is caught."""
    fake = tmp_path / "shardwise" / "model"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from shardwise.engine.shard import ShardModel\n")
    (tmp_path / "shardwise" / "engine").mkdir()
    (tmp_path / "shardwise" / "engine" / "shard.py").write_text("")
    assert broken_rules(tmp_path) == ["shardwise/model/bad.py:1 (model) imports shardwise.engine.shard (engine): "
                              "a model description knows nothing of execution"]
