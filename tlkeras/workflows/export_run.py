"""The exports of a run (``tlkeras.train``'s last step) and ``scripts/export.py``'s edge formats.

:func:`exporter` is what ``tlkeras.workflows.training.fit`` calls before it marks a run done: the
SavedModel (``tlkeras.exports.savedmodel``, with the run's temperature) and each edge format
(``tlkeras.exports.edge``), verified on the held-out split. :func:`export_edge_files` writes one
edge format of an existing SavedModel, ``.keras`` file or run directory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tlkeras import data as data_lib
from tlkeras import progress
from tlkeras.data import dataset_arrays
from tlkeras.exports import edge, layout, savedmodel
from tlkeras.exports.loading import load_exported, load_keras_model, read_images
from tlkeras.fitting.run import RunResult
from tlkeras.workflows.evaluate import labelled_pixels


def exporter(
    export_dir: str | Path | None,
    model_name: str,
    data: Any,
    export_formats: Sequence[str],
    verbose: int = 1,
    explain: bool = False,
):
    """What ``tlkeras.workflows.training.fit`` calls before it marks the run done: the exports
    (or nothing). It returns a callable that completes them: the SavedModel's fresh-process
    verification runs meanwhile (``fit`` writes the report), then the edge formats, which read
    the verified SavedModel."""
    write_saved_model, edge_configs = edge.parse_export_formats(export_formats)

    def export_model(result: RunResult) -> Callable[[], None]:
        if export_dir is None:
            return lambda: None
        with progress.step("export", "Exporting (SavedModel, then verified in a fresh process)"):
            pending = _begin(result)

        def complete() -> None:
            if pending is not None:
                result.export = pending.finish()
            if edge_configs:
                with progress.step("export"):
                    _edge(result)

        complete.cancel = lambda: pending.cancel() if pending is not None else None
        return complete

    def _begin(result: RunResult) -> Any:
        if not write_saved_model:
            return None
        calibrated = result.metrics.get("calibration")
        pending = savedmodel.export(
            result.model,
            model_name,
            base_dir=export_dir,
            class_names=data.class_names,
            metadata={
                "metrics": {"test_accuracy": result.metrics.get("accuracy")},
                "calibration": calibrated or {},
            },
            temperature=calibrated["temperature"] if calibrated else 1.0,
            explain=explain,
            wait=False,
        )
        result.metrics["export"] = str(pending.result.path)
        return pending

    def _edge(result: RunResult) -> None:
        source, version = result.model, None
        if result.export is not None:
            source, version = result.export.path, result.export.version
        result.edge_exports = _edge_exports(
            source, edge_configs, export_dir, model_name, version, data, verbose
        )
        result.metrics["edge_exports"] = {
            r.config.name: {"path": str(r.path), "size_bytes": r.size_bytes, **r.verification}
            for r in result.edge_exports
        }

    return export_model


def _edge_exports(
    source: Any,
    configs: list[Any],
    export_dir: str | Path,
    model_name: str,
    version: int | None,
    data: Any,
    verbose: int = 1,
) -> list[Any]:
    """Each edge format of ``source``, verified on the test split (validation when there is none;
    labels only for single-label data) and int8-calibrated on training images."""
    held_out = data.test if data.test is not None else data.validation
    images, labels = (
        dataset_arrays(held_out, dtype="float32") if held_out is not None else (None, None)
    )
    calibration = None
    if any(c.quantization == "int8" for c in configs):
        calibration, _ = dataset_arrays(
            data.train, limit=max(c.calibration_size for c in configs), dtype="float32"
        )
    if data.multilabel:
        labels = None
    version = version or layout.next_edge_version(export_dir, model_name)
    results = []
    for config in configs:
        out = layout.edge_dir(export_dir, model_name, version, config.name)
        results.append(
            edge.export_edge(
                source,
                out,
                config,
                class_names=data.class_names,
                images=images,
                labels=labels,
                calibration_images=calibration,
            )
        )
        v = results[-1].verification
        accuracy = f", accuracy {v['accuracy']:.1%}" if "accuracy" in v else ""
        if verbose:
            print(
                f"Exported {config.name}: {out} ({results[-1].size_bytes / 1e6:.2f} MB, top-1 "
                f"agreement {v['top1_agreement']:.1%}{accuracy})"
            )
    return results


def export_edge_files(
    model: str | Path,
    config: Any,
    *,
    out_dir: str | Path | None = None,
    base_dir: str | Path = savedmodel.DEFAULT_BASE_DIR,
    model_name: str | None = None,
    class_names: Sequence[str] | None = None,
    images: Sequence[str | Path] = (),
    eval_data: Any = None,
    calibration_data: Any = None,
    max_images: int | None = None,
    overwrite: bool = False,
    max_bad_fraction: float = data_lib.DataConfig.max_bad_fraction,
) -> Any:
    """``scripts/export.py --format=tflite|onnx``: ``model`` is a SavedModel (version or base
    directory), a ``.keras`` file or a run directory; verified on ``eval_data`` (labelled folder:
    accuracy too; every image) or ``images`` (files/folders, at most ``max_images``),
    int8-calibrated on ``calibration_data`` (both folders loaded with ``max_bad_fraction``). The
    default ``out_dir`` is ``layout.edge_dir`` of the model's name and version."""
    path = Path(model)
    version = None
    if path.is_dir() and not (path / "model.keras").is_file():  # a run directory holds model.keras
        version_dir = layout.resolve_version_dir(path)
        source: Any = version_dir
        loaded = load_exported(version_dir)
        names, size = list(class_names or loaded.class_names), loaded.input_size
        version = loaded.version
        model_name = model_name or (version_dir.parent.name if version else version_dir.name)
    else:
        source, names = load_keras_model(path, class_names)
        size = tuple(int(d) for d in source.inputs[0].shape[1:3])
        model_name = model_name or (path.parent.name if path.is_file() else path.name)
    pixels = labels = calibration = None
    if eval_data is not None:
        pixels, labels = labelled_pixels(eval_data, names, size, max_bad_fraction=max_bad_fraction)
    elif images:
        pixels = read_images(images, limit=max_images)
    if calibration_data is not None:
        calibration, _ = dataset_arrays(
            data_lib.load(
                calibration_data,
                image_size=size,
                validation_split=0.0,
                test_split=0.0,
                max_bad_fraction=max_bad_fraction,
            ).train,
            limit=config.calibration_size,
            dtype="float32",
        )
    if out_dir is None:
        version = version or layout.next_edge_version(base_dir, model_name)
        out_dir = layout.edge_dir(base_dir, model_name, version, config.name)
    return edge.export_edge(
        source,
        out_dir,
        config,
        class_names=names,
        images=pixels,
        labels=labels,
        calibration_images=calibration,
        overwrite=overwrite,
    )
