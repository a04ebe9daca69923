"""The package's layering, read from its own import graph (module-level and deferred imports).

- no cycles: every module can be read and tested below the ones that use it;
- the core never imports the harness or the CLI;
- the baselines, the LDS and the result types never import the STRIDE facade or its pipeline;
- the low modules (store, design, data, scores, features, the solvers' numerics, the model
  classes) import nothing of the pipeline above them.
"""

import ast
import pathlib

import stride_jax

ROOT = pathlib.Path(stride_jax.__file__).parent
PIPELINE = {"attribution", "fit", "measure", "steering", "config", "confidence", "show", "prior",
            "groundtruth", "generate", "tokens"}
LOW = {"version", "store", "design", "sharding", "downloads", "data", "scores", "features", "recovery", "lds",
       "tabular", "models.common", "models.gpt", "models.llama", "models.classifiers", "models.registry",
       "models.checkpoint", "models.convert", "models"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports} ("" is the package itself); `from pkg import sub`
    counts as an import of `pkg.sub` only."""
    mods = _modules()
    qual = lambda n: n[len("stride_jax"):].lstrip(".")  # noqa: E731
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stride_jax":
                base = qual(node.module)
                subs = [f"{base}.{a.name}".lstrip(".") for a in node.names]
                if all(s in mods for s in subs):
                    deps.update(subs)
                else:
                    deps.add(base)
            elif isinstance(node, ast.Import):
                deps.update(qual(a.name) for a in node.names if a.name.split(".")[0] == "stride_jax")
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if not state.get(v) and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for m in sorted(graph):
        if not state.get(m) and (found := visit(m)):
            return found
    return None


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "attribution" in graph["harness.methods"]  # the graph is really read
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(m or "stride_jax" for m in cycle)


def test_no_arrow_goes_up():
    graph = import_graph()
    bad = []
    for m, deps in graph.items():
        core = _top(m) not in ("harness", "cli", "")
        for d in deps:
            if core and _top(d) in ("harness", "cli"):
                bad.append(f"{m} -> {d} (the core imports the harness or the CLI)")
            if d == "":
                bad.append(f"{m} -> stride_jax (the package re-exports everything: import the module)")
            if (_top(m) == "baselines" or m in LOW) and d in PIPELINE:
                bad.append(f"{m} -> {d} (a low module or a baseline imports the STRIDE pipeline)")
            if m in LOW and d not in LOW:
                bad.append(f"{m} -> {d} (a low module imports one above the low layer)")
    assert not bad, "\n".join(sorted(bad))
