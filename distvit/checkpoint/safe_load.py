"""Read checkpoint files without running code from them.

Everything distvit writes is JSON, safetensors or a torch file of plain tensors; every torch file
we read goes through `torch.load(weights_only=True)`, whose unpickler builds only tensors,
containers, numbers and the few classes listed here (it never calls anything else).

DeepSpeed's own loaders (engine.load_checkpoint, zero_to_fp32, ds_to_universal) call
`torch.load(weights_only=False)`. We do not hand them a folder until `precheck` has read every
torch file in it with weights_only=True: a file carrying anything but data (a pickle whose
`__reduce__` runs a command, say) is refused there, naming the file, before DeepSpeed opens it.
The types DeepSpeed itself stores in its files (found with
`torch.serialization.get_unsafe_globals_in_checkpoint`) are allowed by name.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointFileError(RuntimeError):
    """A checkpoint file cannot be read (truncated, not a torch file, ...)."""


class UnsafeCheckpointError(CheckpointFileError):
    """A checkpoint file holds something other than data: refused, never executed."""


def _deepspeed_globals() -> list:
    found = []
    for module, names in (
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:  # reading our own files needs no DeepSpeed
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


@contextlib.contextmanager
def _allowed():
    with torch.serialization.safe_globals(_deepspeed_globals()):
        yield


def load(path: Path, *, mmap: bool = False) -> Any:
    """torch.load(path, weights_only=True) on the CPU; any failure is one line naming the file."""
    path = Path(path)
    try:
        with _allowed():
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                # mmap needs torch's zip format; a legacy-format file is read whole instead
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused, it holds more than tensors and plain data ({first}); it was not executed. "
            f"Only load checkpoints you trust; delete this one or resume from another"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad header, ...: all "unreadable"
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise CheckpointFileError(f"{path}: unreadable ({type(exc).__name__}: {first})") from None


def torch_files(tag_dir: Path) -> list[Path]:
    """Every torch file (*.pt) in a checkpoint folder, its subfolders (universal zero/) included."""
    return sorted(p for p in Path(tag_dir).rglob("*.pt") if p.is_file())


def precheck(tag_dir: Path) -> None:
    """Read every torch file of `tag_dir` with weights_only=True (mmap: the tensors are not read).

    Raises UnsafeCheckpointError on the first file that holds code, CheckpointFileError on one
    that cannot be read.
    """
    for f in torch_files(tag_dir):
        load(f, mmap=True)
