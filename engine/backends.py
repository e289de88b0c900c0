"""Which sampling backends this machine can run, answered without importing torch or vllm: the app (Launch
page) and light checks call it; engine/vllm_sampler.py raises BackendUnavailable on the same answer.

    >>> vllm_available()   # False without the GPU extra (pip install -e '.[gpu]')
    False
"""

from __future__ import annotations

import importlib.util

VLLM_INSTALL_HINT = "pip install -e '.[gpu]'"


def vllm_available() -> bool:
    """Whether the vllm package is installed, looked up with importlib.util.find_spec, never imported (an
    import of vllm initialises CUDA libraries and takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken or half-installed package
        return False
