"""The flat module names of tlkeras before its subpackages (``tlkeras.phase``, ``tlkeras.training`` …).

``import tlkeras.phase`` and ``from tlkeras.training import train`` keep working: each old name is a
read-only view of the modules that now hold its contents (:data:`LEGACY`), created on first import.
Code written before the reshape runs unchanged; new code imports from the subpackages. Assigning to a
view (``monkeypatch.setattr(tlkeras.phase, …)``) does not reach the real module: patch the new home.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

# old module -> the modules that hold its public names now, searched in this order.
LEGACY: dict[str, tuple[str, ...]] = {
    "advisor": (
        "tlkeras.analysis.advisor",
        "tlkeras.analysis.transferability",
        "tlkeras.analysis.inputs",
    ),
    "audit": (
        "tlkeras.analysis.audit",
        "tlkeras.analysis.audit_result",
        "tlkeras.analysis.audit_probes",
        "tlkeras.data.sources",
    ),
    "augment": ("tlkeras.data.augment",),
    "backbones": ("tlkeras.models.backbones",),
    "batching": ("tlkeras.serving.batching",),
    "blocks": ("tlkeras.models.blocks",),
    "calibration": ("tlkeras.analysis.calibration",),
    "distribute": ("tlkeras.fitting.distribute",),
    "edge": (
        "tlkeras.exports.edge",
        "tlkeras.exports.edge_formats",
        "tlkeras.exports.edge_convert",
        "tlkeras.exports.edge_verify",
    ),
    "edge_runtime": ("tlkeras.exports.edge_runtime",),
    "exported": ("tlkeras.exports.loading",),
    "features": (
        "tlkeras.fitting.frozen",
        "tlkeras.fitting.feature_cache",
        "tlkeras.fitting.fast_path",
    ),
    "gradcam": ("tlkeras.analysis.gradcam",),
    "head_solver": ("tlkeras.fitting.head_solver",),
    "layout": ("tlkeras.exports.layout",),
    "lr_finder": ("tlkeras.fitting.lr_finder", "tlkeras.fitting.compiling"),
    "model": ("tlkeras.models.builder",),
    "optimizers": ("tlkeras.fitting.optimizers",),
    "phase": (
        "tlkeras.fitting.config",
        "tlkeras.fitting.plan",
        "tlkeras.fitting.runner",
        "tlkeras.fitting.compiling",
        "tlkeras.fitting.optimizers",  # check_choice, which phase imported
    ),
    "report_html": ("tlkeras.workflows.report_html", "tlkeras.workflows.report_content"),
    "reports": ("tlkeras.fitting.reports",),
    "rundir": ("tlkeras.fitting.rundir",),
    "savedmodel": ("tlkeras.exports.savedmodel", "tlkeras.exports.verify"),
    "servables": ("tlkeras.serving.servables",),
    "server": ("tlkeras.serving.server",),
    "signatures": ("tlkeras.exports.signatures", "tlkeras.data.decoding"),
    "spec": ("tlkeras.models.spec",),
    "strategy": ("tlkeras.models.strategy",),
    "sweep": (
        "tlkeras.workflows.sweep",
        "tlkeras.workflows.sweep_report",
        "tlkeras.analysis.inputs",
    ),
    "task": ("tlkeras.models.task",),
    "training": (
        "tlkeras.workflows.training",
        "tlkeras.fitting.run",
        "tlkeras.fitting.evaluation",
        "tlkeras.fitting.loading",
        "tlkeras.workflows.export_run",
        "tlkeras.workflows.evaluate",
        "tlkeras.workflows.report",
    ),
    "transfer": (
        "tlkeras.workflows.transfer",
        "tlkeras.fitting.pretrain",
        "tlkeras.fitting.loading",
    ),
    "tta": ("tlkeras.analysis.tta",),
    "verify": ("tlkeras.exports.verify",),
    "weights": ("tlkeras.models.weights", "tlkeras.data.sizing", "tlkeras.fitting.pretrain"),
}


class _View(types.ModuleType):
    """An old module name: attribute reads go to the first new module that has the name."""

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"Moved: see {', '.join(targets)}.")
        object.__setattr__(self, "_targets", targets)

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        names = set()
        for target in self._targets:
            names.update(n for n in dir(importlib.import_module(target)) if not n.startswith("_"))
        return sorted(names)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != "tlkeras" or name not in LEGACY:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return _View(spec.name, LEGACY[spec.name.rpartition(".")[2]])

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Register the old names, and create every view now: importing a submodule binds it on its
    package, so a view first imported later would replace ``tlkeras.blocks`` (the function) with
    the module of the same old name."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
    for name in LEGACY:
        importlib.import_module(f"tlkeras.{name}")
