"""When our ``dz_<model>`` names enter timm's registry: at once if timm is loaded, else right after timm's first import.

Registering imports timm (and torchvision), about half of the cost of loading the models, so
``import densenet_zoo`` does not do it by itself. A finder on ``sys.meta_path`` waits for the ``timm``
package instead, and imports :mod:`densenet_zoo.models.timm_adapter` (which registers) once timm's own
``__init__`` has run; ``import densenet_zoo; import timm`` and ``import timm; import densenet_zoo`` both give
``timm.create_model("dz_densenet121")``. This module imports nothing but the standard library.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any, Optional, Sequence

ADAPTER = "densenet_zoo.models.timm_adapter"

__all__ = ["register_when_timm_is_imported"]


def _register() -> None:
    try:
        importlib.import_module(ADAPTER)
    except Exception as exc:  # noqa: BLE001 - a failure here must not make `import timm` fail
        warnings.warn(f"densenet_zoo: the dz_ models are not in timm's registry ({type(exc).__name__}: {exc}); "
                      f"`import {ADAPTER}` shows the traceback", RuntimeWarning, stacklevel=2)


class _RegisterAfterExec(importlib.abc.Loader):
    """timm's own loader, followed by our registration once timm's ``__init__`` has finished."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # timm's module keeps its real loader (importlib.resources and reloads ask it), not this wrapper.
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _TimmImportWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first search for ``timm`` it wraps the loader that the other finders give."""

    def __init__(self) -> None:
        self.searching = False

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
                  ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "timm" or self.searching:
            return None
        self.searching = True  # the search below asks every finder again, this one included
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self.searching = False
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec  # timm is not installed (or loads in a way we cannot follow): nothing to register
        sys.meta_path.remove(self)  # one use
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def register_when_timm_is_imported() -> None:
    """Register the ``dz_`` names in timm now if timm is imported, else as soon as it is.

    Returns:
        None. Afterwards, or right after ``import timm``, ``timm.list_models("dz_*")`` lists our models.

    Example::

        register_when_timm_is_imported()   # what `import densenet_zoo` does
        import timm
        timm.create_model("dz_densenet121")
    """
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(finder, _TimmImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportWatcher())
