"""Shared fixtures: tiny random checkpoints built once per session with transformers' classes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "converters"))

import tiny_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "converters"))
from gguf_fixtures import gguf_zoo  # noqa: E402,F401  (session fixture: GGUF files made by llama.cpp)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's interpreter; the flag is read when a kernel is
# defined, so it is set before anything imports qruntime.kernels.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """variant -> path of a tiny HF model dir (built lazily, once per session)."""
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            cache[variant] = tiny_models.build_model(tmp_path_factory.mktemp(f"hf_{variant}"), variant)
        return cache[variant]

    return get


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs `qruntime ARGS` in a fresh interpreter, as a user would from a shell."""
    return subprocess.run([sys.executable, "-m", "qruntime.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def assert_clean_cli_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    """exit 2, one error line naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert fragment in proc.stderr, proc.stderr
