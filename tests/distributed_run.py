"""One process of a distributed test run: ``tlkeras.train`` under a strategy, then a report.

    python tests/distributed_run.py REPORT_DIR DISTRIBUTION [train kwargs as JSON]

Writes ``REPORT_DIR/<task>.npz`` (the final weights) and ``REPORT_DIR/<task>.json`` (history,
whether this process was the chief, and the final model's accuracy and loss on the validation
split recomputed here, to check the metrics Keras logged under the strategy). ``<task>`` is
``worker0``, ``worker1``… from ``TF_CONFIG``, or ``local``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(report_dir: str, distribution: str, kwargs_json: str = "{}") -> None:
    from tlkeras.fitting.distribute import DistributeConfig, make_strategy

    kwargs = json.loads(kwargs_json)
    cpu_replicas = kwargs.pop("cpu_replicas", None)
    # Created before anything else touches TensorFlow (multi-worker and logical CPUs need that).
    strategy = make_strategy(DistributeConfig(distribution, cpu_replicas=cpu_replicas))

    import keras
    import numpy as np

    import tlkeras
    from tlkeras.data.sources import load
    from tlkeras.fitting import distribute

    task_type, task_id = distribute.worker_id(strategy)
    name = f"{task_type}{task_id}" if task_type else "local"
    result = tlkeras.train(distribution=strategy, verbose=2, report=False, **kwargs)

    # The validation split again, batched by one replica's batch, scored outside the strategy.
    data = load(
        kwargs["data_source"],
        image_size=kwargs["image_size"],
        batch_size=32,
        seed=kwargs.get("seed", 0),
    )
    ys, probs = [], []
    for x, y in data.validation:
        probs.append(np.asarray(result.model(x, training=False)))
        ys.append(np.asarray(y))
    y, p = np.concatenate(ys), np.concatenate(probs)
    loss = keras.losses.CategoricalCrossentropy()(keras.ops.one_hot(y, p.shape[1]), p)
    report = {
        "chief": distribute.is_chief(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "history": {k: v for k, v in result.history.items() if k != "phase_boundary"},
        "val_accuracy": float(np.mean(p.argmax(1) == y)),
        "val_loss": float(loss),
        "metrics": result.metrics,
    }
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"{name}.npz", *result.model.get_weights())
    (out / f"{name}.json").write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main(*sys.argv[1:])
