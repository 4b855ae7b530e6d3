"""The package's layers (docs/architecture.md): each module imports only its own layer and those below, the
layers import torch and nothing of Lightning, and the top-level names load lazily."""

import ast
import subprocess
import sys

import pytest

from helpers import REPO

PACKAGE = REPO / "bn_lightning"
# Rank of each layer: a module may import its own layer and lower ranks; compare and blog never each other.
RANKS = {"nn": 0, "training": 1, "callbacks": 2, "doctor": 2, "compare": 3, "blog": 3, "depth": 4}
ENTRY_POINTS = {"__init__.py", "__main__.py", "_compat.py"}  # the package's own files, above every layer
HEAVY = ("lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics", "torchvision", "tensorboard", "matplotlib")


def imports(path) -> set[str]:
    """Every module ``path`` imports, by absolute name (the package imports no relative name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ENTRY_POINTS)


def test_every_module_sits_in_a_layer():
    assert {p.relative_to(PACKAGE).parts[0] for p in MODULES} == set(RANKS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_its_own_layer_and_those_below(path):
    layer = path.relative_to(PACKAGE).parts[0]
    for name in imports(path):
        parts = name.split(".")
        if parts[0] != "bn_lightning" or len(parts) == 1 or parts[1] not in RANKS:
            assert parts[0] != "bn_lightning" or len(parts) > 1 and parts[1] in RANKS, f"{path} imports {name}"
            continue
        target = parts[1]
        assert RANKS[target] < RANKS[layer] or target == layer, f"{path} ({layer}) imports {name} ({target})"


@pytest.mark.parametrize("path", [p for p in MODULES if p.relative_to(PACKAGE).parts[0] == "nn"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_layers_import_torch_and_the_standard_library_only(path):
    outside = {name.split(".")[0] for name in imports(path)} - {"torch", "bn_lightning", "__future__"}
    assert outside <= set(sys.stdlib_module_names), f"{path} imports {outside - set(sys.stdlib_module_names)}"


def loaded_after(code: str) -> list[str]:
    """The heavy packages a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}; import sys; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return eval(out)


def test_the_layers_alone_load_no_lightning():
    assert loaded_after("import bn_lightning.nn; from bn_lightning import BatchNorm2d, BatchRenorm2d, LeNet") == []


def test_the_doctors_plain_pytorch_entry_points_load_no_lightning():
    assert loaded_after("from bn_lightning.doctor import check, watch, Finding") == []


@pytest.mark.slow
def test_the_top_level_names_still_give_the_whole_project():
    code = "from bn_lightning import BatchNorm1d, BatchNorm3d, BatchRenorm1d, Classifier, FashionMNISTDataModule, LeNet"
    assert {"lightning", "torchvision"} <= set(loaded_after(code))
