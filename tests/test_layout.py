"""The house's shape, checked by reading the code (README, "Architecture"):

- floors: pipelines, then model, then configs, then train.py, then bench. A
  module imports only from its own floor or below, at module level and inside
  functions alike, so the loop never stands on the bench;
- no backend imports another backend: what two backends share lives in the
  render stage's own modules;
- no function over 80 lines and no module over 500, but for the exceptions
  named in LONG with their reason;
- train.py names no method and no backend: they are chosen by the registries.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"pipelines": 0, "model": 1, "configs": 2, "train": 3, "bench": 4}
BACKENDS = {"pipelines.dali", "pipelines.ffcv", "pipelines.torchvision", "pipelines.synthetic"}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
# path -> why it is longer than MAX_MODULE_LINES; "path:function" -> why longer than MAX_FUNCTION_LINES
LONG: dict[str, str] = {
    "pipelines/colour.py": "one file on purpose: the per-pixel maths (_pixel_ops) is written once and compiled "
                           "for the CPU and for CUDA here, and bench/cuda_ptx.py maps the kernels' PTX line info "
                           "back to this file's statements (colour.__file__), maths they inline included",
}


def project_files() -> list[Path]:
    files = [ROOT / "train.py"]
    for package in ("pipelines", "model", "configs", "bench"):
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]  # `from . import x`
    return out


def floor(module: str):
    return FLOORS.get(module.split(".")[0])


def test_imports_go_down_the_floors_and_backends_stand_apart():
    bad = []
    for path in project_files():
        me = module_name(path)
        for line, target in imports(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if floor(target) is not None and floor(target) > floor(me):
                bad.append(f"{where} (a higher floor)")
            backend = next((b for b in BACKENDS if target == b or target.startswith(b + ".")), None)
            if backend and me in BACKENDS and backend != me:
                bad.append(f"{where} (a backend imports another)")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_import_walker_sees_every_kind_of_import(tmp_path):
    probe = ROOT / "pipelines" / "_layout_probe.py"
    probe.write_text("import bench.show\nfrom .torchvision import decode\nfrom . import dali\n"
                     "def f():\n    from train import main\n")
    try:
        found = {t for _, t in imports(probe)}
    finally:
        probe.unlink()
    assert {"bench.show", "pipelines.torchvision", "pipelines.dali", "train"} <= found


def lengths():
    for path in project_files():
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        yield rel, None, text.count("\n") + (not text.endswith("\n"))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield rel, node.name, node.end_lineno - node.lineno + 1


def test_modules_and_functions_are_short_but_for_the_named_exceptions():
    bad = []
    for rel, function, n in lengths():
        key, limit = (rel, MAX_MODULE_LINES) if function is None else (f"{rel}:{function}", MAX_FUNCTION_LINES)
        if n > limit and key not in LONG:
            bad.append(f"{key}: {n} lines (limit {limit})")
    assert not bad, "\n".join(bad)
    stale = [key for key in LONG if not any(
        (rel if f is None else f"{rel}:{f}") == key and n > (MAX_MODULE_LINES if f is None else MAX_FUNCTION_LINES)
        for rel, f, n in lengths())]
    assert not stale, f"LONG names what is no longer long: {stale}"


def test_train_names_no_method_and_no_backend():
    from model.methods import METHODS
    names = set(METHODS) | {b.split(".")[1] for b in BACKENDS}
    text = (ROOT / "train.py").read_text()
    found = sorted({m.group(0) for m in re.finditer(r"\b(" + "|".join(sorted(names)) + r")\b", text, re.I)})
    assert not found, f"train.py names {found}"


@pytest.mark.parametrize("module", ["pipelines.views", "model.step", "train"])
def test_floor_of_known_modules(module):
    assert floor(module) == {"pipelines": 0, "model": 1, "train": 3}[module.split(".")[0]]
