"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# Flower must never install an app's dependencies at run time (that would pull a CUDA torch).
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
# Default location of the read-only shared test data, next to the repository.
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Let the tests run from a plain checkout (src layout, package not installed).
if importlib.util.find_spec("ssfl") is None:  # pragma: no cover - depends on the env
    sys.path.insert(0, str(REPO_ROOT / "src"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Folder with the real data sets: ``$SSFL_DATA_DIR``, else ``<repo>/../shared/data``."""
    path = Path(os.environ.get("SSFL_DATA_DIR") or DEFAULT_SHARED_DATA).expanduser()
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path}; set SSFL_DATA_DIR to the folder "
                    f"holding cifar-10-batches-bin/ etc. to run this test")
    return path
