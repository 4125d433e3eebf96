"""The packages import downwards only, by the layers of LAYER. `slurm.jobs` (what a training process
asks of SLURM) is a leaf like models and datasets; experiments (the engine) sits on them; the SLURM
launcher (`slurm.launcher`) and analysis sit on the engine; the command line of experiments
(`experiments.__main__`, which dispatches `submit`/`status` to the launcher) and the benchmark
scripts are on top, and no library module imports them. Inside experiments the modules form no
import cycle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# module prefix -> layer; a module's layer is that of its longest prefix here
LAYER = {"benchmarks": 3, "experiments.__main__": 3, "analysis": 2, "slurm.launcher": 2, "slurm": 0,
         "experiments": 1, "models": 0, "datasets": 0}
PACKAGES = sorted({prefix.split(".")[0] for prefix in LAYER})


def layer_of(module):
    """(the LAYER prefix a module falls under, its layer), or None for modules outside LAYER."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYER:
            return prefix, LAYER[prefix]
    return None


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


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_packages_import_downwards_only():
    upward = []
    for package in PACKAGES:
        for path in package_files(package):
            group, level = layer_of(module_name(path))
            for name in imports(path):
                target = layer_of(name)
                if target and target[0] != group and target[1] >= level:
                    upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, upward


def test_every_folder_of_python_code_has_a_layer():
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert folders - {"tests"} <= set(PACKAGES), folders


def test_experiments_modules_form_no_cycle_and_slurm_is_on_top():
    modules = {p.stem: p for p in package_files("experiments") if p.parent == ROOT / "experiments"}
    graph = {m: {n.split(".")[1] for n in imports(p) if n.startswith("experiments.") and n.split(".")[1] in modules
                 and n.split(".")[1] != m}
             for m, p in modules.items()}
    assert "__main__" not in set().union(*graph.values())
    launcher = {m for m, p in modules.items() if any(n.startswith("slurm.launcher") for n in imports(p))}
    assert launcher <= {"__main__"}, launcher  # the launcher is on top of the engine

    def visit(module, path):
        for dep in graph[module]:
            assert dep not in path, f"import cycle: {' -> '.join(path + [dep])}"
            visit(dep, path + [dep])

    for module in graph:
        visit(module, [module])
