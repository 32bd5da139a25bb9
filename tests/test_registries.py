"""Model and data set registries (added from user code) and the data modules' import order."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import ssfl.data.datasets as datasets_module
from ssfl import models
from ssfl.data import DATASETS, ImageDataset, load_dataset, register_dataset
from ssfl.data.datasets import source_files
from ssfl.models import MODELS, build_model, register_model

DATA_PACKAGE = Path(datasets_module.__file__).parent


@pytest.fixture(autouse=True)
def _restore_registries() -> Iterator[None]:
    """Undo what a test registered: the registries are process-wide."""
    saved_models = dict(models._BUILDERS)
    saved_loaders = dict(datasets_module._LOADERS)
    saved_files = dict(datasets_module._SOURCE_FILES)
    yield
    for registry, saved in ((models._BUILDERS, saved_models),
                            (datasets_module._LOADERS, saved_loaders),
                            (datasets_module._SOURCE_FILES, saved_files)):
        registry.clear()
        registry.update(saved)


# ----------------------------------------------------------------- models


class _ToyNet(nn.Module):
    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _register_toy(name: str = "toy_linear", **kwargs: bool) -> None:
    @register_model(name, **kwargs)
    def build_toy(num_classes: int, *, in_channels: int, image_size: int,
                  width: float) -> nn.Module:
        return _ToyNet(num_classes, in_channels * image_size * image_size)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_registered_model_is_built_by_name_and_seeded() -> None:
    _register_toy()
    assert "toy_linear" in MODELS
    shape = dict(num_classes=3, in_channels=1, image_size=4)
    before = torch.random.get_rng_state()
    a = build_model("toy_linear", **shape, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    # The toy builder was called, not a fallback such as SmallCNN.
    assert isinstance(a, _ToyNet) and a(torch.zeros(2, 1, 4, 4)).shape == (2, 3)
    b = build_model("toy_linear", **shape, seed=1)
    c = build_model("toy_linear", **shape, seed=2)
    assert torch.equal(_flat(a), _flat(b)) and not torch.equal(_flat(a), _flat(c))


def test_builtin_models_are_still_built_by_their_names() -> None:
    shape = dict(num_classes=10, in_channels=3, image_size=32, width=0.125, seed=0)
    assert isinstance(build_model("resnet18", **shape), models.ResNet18)
    assert isinstance(build_model("small_cnn", **shape), models.SmallCNN)
    assert list(MODELS)[:2] == ["resnet18", "small_cnn"]


def test_unknown_model_names_the_known_ones() -> None:
    _register_toy()
    with pytest.raises(ValueError) as err:
        build_model("vgg16", num_classes=10, in_channels=3, image_size=32, seed=0)
    msg = str(err.value)
    assert "'vgg16'" in msg
    assert all(known in msg for known in ("resnet18", "small_cnn", "toy_linear"))


def test_model_registered_twice_is_refused_unless_replaced() -> None:
    _register_toy()
    with pytest.raises(ValueError, match="already registered"):
        _register_toy()
    with pytest.raises(ValueError, match="already registered"):
        register_model("small_cnn")(lambda num_classes, **_: nn.Linear(1, num_classes))

    @register_model("toy_linear", replace=True)
    def build_other(num_classes: int, *, in_channels: int, image_size: int,
                    width: float) -> nn.Module:
        return nn.Linear(1, num_classes)

    model = build_model("toy_linear", num_classes=2, in_channels=1, image_size=4, seed=0)
    assert isinstance(model, nn.Linear)


def test_models_registry_is_read_only_and_checks_results() -> None:
    with pytest.raises(TypeError):
        MODELS["direct"] = models.SmallCNN  # type: ignore[index]
    with pytest.raises(ValueError, match="non-empty"):
        register_model("")

    @register_model("not_a_module")
    def build_bad(num_classes: int, *, in_channels: int, image_size: int,
                  width: float) -> nn.Module:
        return "oops"  # type: ignore[return-value]

    with pytest.raises(TypeError, match="not_a_module"):
        build_model("not_a_module", num_classes=2, in_channels=1, image_size=4, seed=0)


# ----------------------------------------------------------------- data sets


def _toy_dataset(split: str) -> ImageDataset:
    n = 6 if split == "train" else 2
    images = torch.arange(n * 4, dtype=torch.uint8).reshape(n, 1, 2, 2)
    return ImageDataset("toy", images, torch.arange(n) % 2, num_classes=2,
                        class_names=("even", "odd"), mean=(0.5,), std=(0.25,))


def test_registered_dataset_is_loaded_by_name(tmp_path: Path) -> None:
    calls: list[tuple[Path, str, bool]] = []

    @register_dataset("toy_set")
    def load_toy(root: Path, split: str, download: bool) -> ImageDataset:
        calls.append((root, split, download))
        return _toy_dataset(split)

    assert "toy_set" in DATASETS and list(DATASETS)[-1] == "toy_set"
    train = load_dataset("toy_set", tmp_path, "train")
    assert len(train) == 6 and train.labels.tolist() == [0, 1, 0, 1, 0, 1]
    # Same spelling rules as the built-ins; the root arrives resolved.
    test = load_dataset("Toy-Set", str(tmp_path), "test", download=True)
    assert len(test) == 2
    assert calls == [(tmp_path, "train", False), (tmp_path, "test", True)]
    assert source_files("toy_set", tmp_path, "train") == []  # registered without files=


def test_registered_dataset_files_feed_source_files(tmp_path: Path) -> None:
    data_file = tmp_path / "toy.bin"

    @register_dataset("toy_files", files=lambda root, split: [root / "toy.bin"])
    def load_toy(root: Path, split: str, download: bool) -> ImageDataset:
        return _toy_dataset(split)

    assert source_files("toy_files", tmp_path, "train") == [data_file]


def test_unknown_dataset_names_the_known_ones() -> None:
    register_dataset("toy_set")(lambda root, split, download: _toy_dataset(split))
    with pytest.raises(ValueError) as err:
        load_dataset("mnist", None, "train")
    msg = str(err.value)
    assert "'mnist'" in msg
    assert all(known in msg for known in ("cifar10", "tinyimagenet", "digits", "toy_set"))
    with pytest.raises(ValueError, match="mnist"):
        source_files("mnist", None, "train")


def test_dataset_registered_twice_is_refused_unless_replaced() -> None:
    def load_toy(root: Path, split: str, download: bool) -> ImageDataset:
        return _toy_dataset(split)

    register_dataset("toy_set")(load_toy)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("toy_set")(load_toy)
    # A spelling that load_dataset would resolve to a built-in counts as that name.
    with pytest.raises(ValueError, match="'cifar10'"):
        register_dataset("CIFAR-10")(load_toy)
    register_dataset("digits", replace=True)(load_toy)
    assert load_dataset("digits", None, "train").name == "toy"
    assert list(DATASETS).count("digits") == 1


def test_datasets_registry_is_read_only_and_checks_results() -> None:
    with pytest.raises(TypeError):
        DATASETS["direct"] = lambda root, split, download: None  # type: ignore[index]
    register_dataset("bad_set")(lambda root, split, download: None)
    with pytest.raises(TypeError, match="bad_set"):
        load_dataset("bad_set", None, "train")


# ----------------------------------------------------------------- import structure


def _package_imports(path: Path) -> set[str]:
    """Sibling modules of ssfl.data that ``path`` imports at module level (not in functions),
    i.e. what Python must import first when it imports ``path``."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                found.add(module.split(".")[0])
            elif module.startswith("ssfl.data."):
                found.add(module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names
                         if a.name.startswith("ssfl.data."))
    return found


def test_data_modules_import_each_other_without_a_cycle() -> None:
    graph = {p.stem: _package_imports(p) for p in DATA_PACKAGE.glob("*.py")
             if p.stem != "__init__"}
    assert "datasets" not in graph["download"] and "datasets" not in graph["files"]
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [("download", "datasets"), ("datasets", "download")])
def test_data_modules_import_in_any_order(first: str, second: str) -> None:
    code = (f"import ssfl.data.{first}, ssfl.data.{second}\n"
            f"from ssfl.data.download import ARCHIVES, DATASET_ARCHIVES, download_and_extract\n"
            f"from ssfl.data.datasets import DATASETS, CorruptDatasetError, source_files\n"
            f"assert set(DATASET_ARCHIVES) <= set(DATASETS)\n"
            f"assert ssfl.data.download.CorruptDatasetError is CorruptDatasetError\n")
    # The source folder first, as conftest.py does, in case the package is not installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(DATA_PACKAGE.parents[1]), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
