"""The package's layers: every import points down (or stays inside its own package), never up or sideways."""

import ast
from pathlib import Path

import gptoss

PACKAGE = Path(gptoss.__file__).parent

# Bottom first. A module may import from its own package and from any package on a lower layer.
LAYERS = [
    {"errors"},
    {"quant"},
    {"kernels", "distributed"},
    {"model", "chat"},
    {"weights", "analysis"},
    {"generation", "tools", "nano"},
    {"server"},
    {"cli"},
]
LAYER_OF = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def package_of(module: str) -> str | None:
    """"gptoss.kernels.ops" -> "kernels"; None for modules outside gptoss and for gptoss itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "gptoss" and len(parts) > 1 else None


def gptoss_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a gptoss module in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "gptoss"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            if node.module == "gptoss":  # `from gptoss import kernels` names packages
                found += [(node.lineno, f"gptoss.{alias.name}") for alias in node.names]
            elif node.module and node.module.startswith("gptoss."):
                found.append((node.lineno, node.module))
    return found


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert packages == set(LAYER_OF)


def test_imports_only_point_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative == Path("__init__.py"):  # the package's front door imports from every layer
            continue
        own = relative.parts[0].removesuffix(".py")
        for line, module in gptoss_imports(path):
            target = package_of(module)
            if target is None:
                wrong.append(f"{relative}:{line} imports the top-level package ({module})")
            elif target != own and LAYER_OF[target] >= LAYER_OF[own]:
                wrong.append(f"{relative}:{line} ({own}, layer {LAYER_OF[own]}) imports {module} "
                             f"({target}, layer {LAYER_OF[target]})")
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    """The walk finds imports inside functions too, so a lazy upward import cannot hide."""
    source = tmp_path / "m.py"
    source.write_text("import torch\n\ndef f():\n    from gptoss.server.engine import Engine\n    import gptoss.cli.main\n")
    assert gptoss_imports(source) == [(4, "gptoss.server.engine"), (5, "gptoss.cli.main")]
