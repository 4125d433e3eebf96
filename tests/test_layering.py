"""The packages import downwards only: analysis -> experiments -> models, datasets; inside
experiments the modules form no import cycle, and SLURM submission (experiments.slurm) sits on top
of the training engine, imported only by the command line."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"analysis": 2, "experiments": 1, "models": 0, "datasets": 0}


def imports(path):
    """Absolute module names a file imports (relative imports resolved), at any depth of the file."""
    package = path.relative_to(ROOT).with_suffix("").parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:-node.level])  # package[-1] is the file's own module name
                module = ".".join(base + ([node.module] if node.module else []))
                names.add(module)
                if not node.module:  # `from . import a, b`: the modules a, b
                    names.update(f"{module}.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_files(package):
    return sorted((ROOT / package).rglob("*.py"))


def test_packages_import_downwards_only():
    upward = []
    for package, level in LAYER.items():
        for path in package_files(package):
            for name in imports(path):
                top = name.split(".")[0]
                if top in LAYER and top != package and LAYER[top] >= level:
                    upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, upward


def test_experiments_modules_form_no_cycle_and_slurm_is_on_top():
    modules = {p.stem: p for p in package_files("experiments") if p.parent == ROOT / "experiments"}
    graph = {m: {n.split(".")[1] for n in imports(p) if n.startswith("experiments.") and n.split(".")[1] in modules
                 and n.split(".")[1] != m}
             for m, p in modules.items()}
    assert {m for m, deps in graph.items() if "slurm" in deps} <= {"__main__"}
    assert "slurm" not in graph["engine"] and "__main__" not in set().union(*graph.values())

    def visit(module, path):
        for dep in graph[module]:
            assert dep not in path, f"import cycle: {' -> '.join(path + [dep])}"
            visit(dep, path + [dep])

    for module in graph:
        visit(module, [module])
