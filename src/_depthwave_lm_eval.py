"""Makes `lm_eval --model depthwave` work once depthwave is installed.

lm-eval looks models up in a registry that it fills when `lm_eval.models` is imported, and it reads no plugin
entry points. `_depthwave_lm_eval.pth` (installed next to this module) imports this module at interpreter start;
it imports nothing heavy, and only watches for `lm_eval.models`: once that has loaded, the name `depthwave` is
registered as a lazy reference to `depthwave.eval.lm_harness:DepthwaveLM`, like lm-eval's own models.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

NAME = "depthwave"
TARGET = "depthwave.eval.lm_harness:DepthwaveLM"


def register() -> None:
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


class _Watcher(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "lm_eval.models":
            return None
        sys.meta_path.remove(self)  # the real spec, found without us; we are done after this import
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(finder, _Watcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())


install()
