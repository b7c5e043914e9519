"""The modules of training_code/ import each other without a circle, counting imports inside functions."""
import ast
import glob
import os

CODE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training_code")


def local_imports():
    """{module: set of training_code modules it imports anywhere in its body}."""
    paths = glob.glob(os.path.join(CODE, "*.py"))
    names = {os.path.basename(p)[:-3] for p in paths}
    graph = {}
    for path in paths:
        found = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
                  and node.args and isinstance(node.args[0], ast.Constant)):  # importlib.import_module('name')
                found.add(str(node.args[0].value))
        name = os.path.basename(path)[:-3]
        graph[name] = (found & names) - {name}
    return graph


def find_cycle(graph):
    """One import circle as a list of modules (first = last), or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_import_circle():
    graph = local_imports()
    assert "inference_tools" in graph["candidates"] and "decoding" in graph["batched_dfs"]  # the parser sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def scripts(names):
    """The entry scripts among module names: run_<stage>_<model>.py, make_<thing>.py and compare_results.py."""
    return {n for n in names if n.startswith(("run_", "make_", "compare_")) and n != "run_record"}


def test_no_module_imports_a_script():
    # A script is a command line, not a library: what two scripts share lives in a library module
    # (the ArcMini recipe in arcmini.py, the devices' measurements in run_record.py).
    graph = local_imports()
    assert {"run_finetuning_ArcMini", "run_evaluation_ArcMini", "make_base_SmolLM2"} <= scripts(graph)
    importing = {name: sorted(found & scripts(graph)) for name, found in graph.items() if found & scripts(graph)}
    assert importing == {}, importing
