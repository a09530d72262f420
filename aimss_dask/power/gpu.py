"""Lazy access to the optional GPU stack (the ``gpu`` extra: CuPy, NVML)."""

from __future__ import annotations

import importlib
from types import ModuleType


def optional_import(name: str) -> ModuleType | None:
    """Import ``name`` if it is installed and usable, else ``None``."""
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a CUDA library that fails to load
        return None


def gpu_count() -> int:
    """Number of CUDA devices NVML sees; 0 without NVML or without a GPU."""
    pynvml = optional_import("pynvml")
    if pynvml is None:
        return 0
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def is_cupy_array(obj: object) -> bool:
    """True for a CuPy array, without importing CuPy when it is not loaded."""
    import sys

    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(obj, cupy.ndarray)
