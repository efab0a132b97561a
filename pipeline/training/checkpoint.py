"""Training checkpoints: written atomically, read back without unpickling code.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only, so `torch.load` runs with
`weights_only=True` and a crafted pickle is refused instead of executed.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import CheckpointError
from pipeline.files import write_atomic


def save(state: dict, path: Path) -> None:
    """Atomic: a crash or full disk leaves the previous checkpoint intact."""
    write_atomic(path, lambda handle: torch.save(state, handle), mode="wb")


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"refusing checkpoint {path}: it is not a plain tensor checkpoint written by this "
            f"pipeline ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "train without --resume to start a new run"
        ) from None


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG the training loop draws from, in checkpoint-safe types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
