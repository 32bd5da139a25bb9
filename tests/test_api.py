"""The Python API: the worked example of docs/api.md runs as written."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def test_the_api_docs_example_runs(tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    block = text.split("<!-- example: api -->", 1)[1].split("```python\n", 1)[1]
    namespace: dict[str, Any] = {"RUN_DIR": tmp_path / "run"}
    exec(compile(block.split("```", 1)[0], "docs/api.md", "exec"), namespace)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert len(namespace["seen"]) == 3


def test_import_ssfl_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, ssfl; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
