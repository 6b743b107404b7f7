"""Lets timm's *model* code import on machines where torchvision cannot be installed.

PyPI's torchvision does not load beside the CPU torch pin (its C++ ops are built for another
torch), and timm imports torchvision at module level only for data transforms and a frozen
batch-norm we never build. The tests compare our models against timm's own implementation, so
they install this finder, which answers every `torchvision.*` import with an inert module.
Never used outside tests, and only when the real torchvision fails to import.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path


class _MetaInert(type):
    def __getattr__(cls, name):
        return _Inert()


class _Inert(metaclass=_MetaInert):
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name):
        return _Inert()

    def __hash__(self):
        return id(self)


def _inert_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []

    def module_getattr(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert if attr[:1].isupper() else _Inert()

    module.__getattr__ = module_getattr
    return module


class _InertFinder:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _inert_module(spec.name)

    def exec_module(self, module):
        pass


REFERENCE_DIR = Path(__file__).resolve().parent.parent / ".venv" / "reference"


def import_timm():
    """Import timm, stubbing torchvision if the real one does not load. Returns the module or None.

    timm is looked for in the environment first, then in .venv/reference, where `make test`
    installs it (outside site-packages, so that accelerate's CLI does not import it).
    """
    if REFERENCE_DIR.is_dir() and str(REFERENCE_DIR) not in sys.path:
        sys.path.append(str(REFERENCE_DIR))
    try:
        import timm  # noqa: F401

        return timm
    except ImportError as exc:
        if "torchvision" not in str(exc) and "nms" not in str(exc):
            return None
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.") or n == "timm" or n.startswith("timm.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _InertFinder())
    try:
        import timm

        return timm
    except Exception:
        return None
