"""Training on many devices and machines with TensorFlow's own ``tf.distribute`` strategies.

tlkeras adds no engine of its own: :func:`make_strategy` creates the ``tf.distribute`` strategy a
:class:`DistributeConfig` names, ``tlkeras.train`` builds and compiles the model under its scope and
``keras.Model.fit`` does the rest. This module holds what a correct multi-worker run needs around it:

- ``batch_size`` is per replica; the datasets are batched by :func:`global_batch_size` and
  ``tf.distribute`` splits each global batch across the replicas (and workers).
- Multi-worker input is sharded by *data* (``AutoShardPolicy.DATA``, :func:`shard_by_data`): every
  worker reads the same seeded, shuffled file list and keeps its part of each global batch, so no
  example is seen twice or dropped, whatever the number of files.
- The run starts from the chief's weights (:func:`sync_from_chief`), so workers agree even when a
  weights file differs between machines.
- Only the chief writes the run directory, plots, metrics and exports (:func:`is_chief`); the
  others work in a private copy of the chief's run directory (:func:`worker_copy`), which is how
  a restarted worker resumes from the chief's ``BackupAndRestore`` checkpoint.
- :func:`keras_fixes` works around Keras 3 bugs that stop ``fit`` under a strategy (uneven last
  batches; every multi-worker run: tensorflow/tensorflow#72388).

The cluster of a ``multi_worker`` run comes from ``TF_CONFIG`` (one per process); the run
directory must be on storage every worker can read (a shared volume, GCS…).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tensorflow as tf

from tlkeras import checks

EXIT_RETRY = 75  # sysexits EX_TEMPFAIL: a cluster manager should restart the worker


class WorkerLost(RuntimeError):
    """A peer worker stopped during multi-worker training; re-running every worker resumes."""

    exit_code = EXIT_RETRY


@contextlib.contextmanager
def lost_worker_as_error(
    strategy: tf.distribute.Strategy, run_dir: str | Path | None = None
) -> Iterator[None]:
    """Turn the collective-op failure of a lost peer into :class:`WorkerLost` with the fix."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError) as e:
        if not is_multi_worker(strategy):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next(
            (line for line in lines if "abort" in line.lower()), lines[-1] if lines else ""
        )
        resume = f" to resume from the last epoch backed up in {run_dir}" if run_dir else ""
        raise WorkerLost(
            f"a worker was lost during training ({type(e).__name__}: {detail[:160]}); "
            f"run the same command on every worker again{resume}"
        ) from e


class Distribution(str, enum.Enum):
    """Which ``tf.distribute`` strategy trains the model."""

    DEFAULT = "default"  # no strategy: one device (TensorFlow's default strategy)
    MIRRORED = "mirrored"  # every local GPU (or ``cpu_replicas`` logical CPUs), synchronous
    MULTI_WORKER = "multi_worker"  # MultiWorkerMirroredStrategy over the TF_CONFIG cluster
    TPU = "tpu"  # TPUStrategy

    @classmethod
    def parse(cls, value: Any) -> Distribution:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ValueError(
                f"distribution: expected one of {[d.value for d in cls]}, received {value!r}"
            ) from None


@dataclass(frozen=True)
class DistributeConfig:
    """How to distribute a run. Validated on creation.

    Attributes:
        distribution: a :class:`Distribution` (or its name).
        cpu_replicas: ``mirrored`` only: split the host CPU into this many logical devices and
            mirror over them (CPU-only machines and tests); ``None`` mirrors over the local GPUs.
        tpu: ``tpu`` only: the TPU name or ``grpc://`` address, ``"local"`` for a TPU VM, ``None``
            to resolve it from the environment (Cloud TPU, Colab).
    """

    # metadata: the options as the scripts show them (tlkeras.cli.define_config_flags).
    distribution: Distribution | str = field(
        default=Distribution.DEFAULT,
        metadata={
            "help": "tf.distribute strategy; multi_worker reads the cluster from TF_CONFIG. "
            "--batch_size is then per replica.",
            "choices": tuple(d.value for d in Distribution),
        },
    )
    cpu_replicas: int | None = field(
        default=None,
        metadata={"help": "mirrored only: split the CPU into N logical devices (no GPU needed)."},
    )
    tpu: str | None = field(
        default=None,
        metadata={"help": "tpu only: TPU name or grpc:// address, or 'local' (TPU VM)."},
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "distribution", Distribution.parse(self.distribution))
        n = self.cpu_replicas
        if n is not None:
            checks.integer("cpu_replicas", n, 1, optional=True)
            if self.distribution is not Distribution.MIRRORED:
                raise ValueError(
                    "cpu_replicas: expected only with distribution='mirrored', received "
                    f"distribution={self.distribution.value!r}"
                )
        if self.tpu is not None and self.distribution is not Distribution.TPU:
            raise ValueError(
                "tpu: expected only with distribution='tpu', received "
                f"distribution={self.distribution.value!r}"
            )


def read_tf_config() -> dict[str, Any]:
    """The parsed ``TF_CONFIG`` of this process, checked for a cluster and this task."""
    text = os.environ.get("TF_CONFIG", "")
    example = (
        '{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
        '"task": {"type": "worker", "index": 0}}'
    )
    if not text.strip():
        raise ValueError(
            f"distribution='multi_worker': expected the TF_CONFIG environment variable, e.g. "
            f"{example}, received none"
        )
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        members = cluster[task["type"]]
        index = int(task["index"])
        if not 0 <= index < len(members):
            raise IndexError(index)
    except (ValueError, KeyError, TypeError, IndexError):
        raise ValueError(
            f"TF_CONFIG: expected JSON like {example} with task.index inside its job, "
            f"received {text!r}"
        ) from None
    return config


def loopback_tf_configs(workers: int) -> list[str]:
    """One ``TF_CONFIG`` per worker of a cluster on this machine (free localhost ports): try a
    multi-worker run, or test one, without a cluster."""
    sockets = [socket.socket() for _ in range(workers)]
    for s in sockets:
        s.bind(("localhost", 0))
    hosts = [f"localhost:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    return [
        json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})
        for i in range(workers)
    ]


def split_cpu(replicas: int) -> list[str]:
    """Split the host CPU into ``replicas`` logical devices; their names for ``MirroredStrategy``.

    Must run before TensorFlow initialises its devices (before the first tensor is made).
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if not existing or len(existing) != replicas:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
            )
        except RuntimeError:
            have = len(tf.config.list_logical_devices("CPU"))
            if have < replicas:
                raise ValueError(
                    f"cpu_replicas: expected to split the CPU before TensorFlow starts, received "
                    f"cpu_replicas={replicas} after start-up with {have} logical CPU(s); create "
                    "the strategy first in the process"
                ) from None
    return [f"/cpu:{i}" for i in range(replicas)]


def make_strategy(config: DistributeConfig | str | None = None) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy of ``config`` (create it first thing in the process).

    Raises:
        ValueError: ``multi_worker`` without a usable ``TF_CONFIG``; ``tpu`` with no TPU reachable.
    """
    if not isinstance(config, DistributeConfig):
        config = DistributeConfig(Distribution.DEFAULT if config is None else config)
    kind = config.distribution
    if kind is Distribution.DEFAULT:
        return tf.distribute.get_strategy()
    if kind is Distribution.MIRRORED:
        if config.cpu_replicas:
            return tf.distribute.MirroredStrategy(split_cpu(config.cpu_replicas))
        return tf.distribute.MirroredStrategy()  # every GPU; the CPU when there is none
    if kind is Distribution.MULTI_WORKER:
        read_tf_config()
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        message = " ".join(str(e).split())[:200]
        raise ValueError(
            f"distribution='tpu': expected a reachable TPU (tpu={config.tpu!r}), received "
            f"{type(e).__name__}: {message}"
        ) from None


def is_distributed(strategy: tf.distribute.Strategy) -> bool:
    """True for any strategy but TensorFlow's default (one-device) strategy."""
    with strategy.scope():
        return tf.distribute.has_strategy()


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True for a ``MultiWorkerMirroredStrategy`` spanning more than one worker."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = strategy.cluster_resolver
    if resolver is None or resolver.task_type is None:
        return False
    jobs = resolver.cluster_spec().as_dict()
    return len(jobs.get("worker", [])) + len(jobs.get("chief", [])) > 1


def worker_id(strategy: tf.distribute.Strategy) -> tuple[str | None, int]:
    """``(task_type, task_id)`` of this process (``(None, 0)`` outside a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not is_multi_worker(strategy) or resolver is None:
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def chief_of(task_type: str | None, task_id: int, cluster: dict[str, Any]) -> bool:
    """The chief rule of the Keras multi-worker guide: the ``chief`` task if the cluster has one,
    else ``worker`` 0; a process outside a cluster is its own chief."""
    if task_type is None or task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's outputs (see :func:`chief_of`)."""
    task_type, task_id = worker_id(strategy)
    if task_type is None:
        return True
    return chief_of(task_type, task_id, strategy.cluster_resolver.cluster_spec().as_dict())


def describe(strategy: tf.distribute.Strategy) -> str:
    """One line: strategy, replicas and this process's role."""
    if not is_distributed(strategy):
        return "default (one device)"
    # MultiWorkerMirroredStrategy's class is CollectiveAllReduceStrategy: say the public name.
    public = (
        (tf.distribute.MultiWorkerMirroredStrategy, "MultiWorkerMirroredStrategy"),
        (tf.distribute.MirroredStrategy, "MirroredStrategy"),
        (tf.distribute.TPUStrategy, "TPUStrategy"),
    )
    name = next((n for c, n in public if isinstance(strategy, c)), type(strategy).__name__)
    task_type, task_id = worker_id(strategy)
    role = f", {task_type} {task_id}{' (chief)' if is_chief(strategy) else ''}" if task_type else ""
    return f"{name}, {strategy.num_replicas_in_sync} replica(s){role}"


def global_batch_size(per_replica: int, strategy: tf.distribute.Strategy) -> int:
    """The batch the datasets are made with: ``per_replica`` × replicas in sync."""
    return int(per_replica) * int(strategy.num_replicas_in_sync)


def shard_by_data(dataset: tf.data.Dataset | None, strategy: tf.distribute.Strategy):
    """Shard a multi-worker dataset by element, not by file.

    tlkeras datasets start from an in-memory list of files or arrays, where ``AUTO`` sharding
    finds no files to split and falls back with a warning; ``DATA`` says so explicitly. It is
    correct because every worker produces the same order (seeded shuffle).
    """
    if dataset is None or not is_multi_worker(strategy):
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _collective(strategy: tf.distribute.Strategy, per_replica) -> tf.Tensor:
    """The sum over every replica of ``per_replica()``, as one graph (eager collectives are slow)."""

    def reduce():
        return strategy.reduce("SUM", strategy.run(per_replica), axis=None)

    with lost_worker_as_error(strategy):
        return tf.function(reduce, autograph=False)()


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Wait until every worker gets here (a one-number all-reduce); no-op on one worker."""
    if is_multi_worker(strategy):
        _collective(strategy, lambda: tf.constant(1.0))


def sync_from_chief(model: Any, strategy: tf.distribute.Strategy) -> None:
    """Give every worker the chief's weights (replica 0 runs on worker 0 / the chief).

    Variables made under the scope start equal, but weights *loaded* afterwards (a file, a
    ``source:`` pre-training) are per worker; a difference would never be averaged away.
    """
    if not is_multi_worker(strategy):
        return
    # Float weights only: the integer seed states of augmentation layers may differ harmlessly.
    variables = [v for v in model.weights if "float" in str(v.dtype)]

    sizes = [int(tf.size(v.value)) for v in variables]

    def chief_values():  # one flat vector: a single all-reduce for the whole model
        first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
        flat = tf.concat([tf.reshape(tf.cast(v.value, tf.float32), [-1]) for v in variables], 0)
        return tf.where(first, flat, tf.zeros_like(flat))

    summed = _collective(strategy, chief_values)
    for variable, value in zip(variables, tf.split(summed, sizes), strict=True):
        variable.assign(tf.cast(tf.reshape(value, variable.shape), variable.dtype))


def worker_copy(run_dir: str | Path, strategy: tf.distribute.Strategy) -> Path:
    """A private copy of the chief's ``run_dir`` for a non-chief worker (state, history, backups,
    best model): it resumes exactly where the chief will, and writes nowhere the chief reads."""
    task_type, task_id = worker_id(strategy)
    copy = Path(tempfile.mkdtemp(prefix=f"tlkeras-{task_type}{task_id}-"))
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        shutil.copytree(
            run_dir, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("tb", "*.png")
        )
    return copy


@contextlib.contextmanager
def keras_fixes(strategy: tf.distribute.Strategy) -> Iterator[None]:
    """Work around Keras 3 bugs that stop ``fit``/``evaluate`` under a ``tf.distribute`` strategy.

    Checked up to Keras 3.15.1 (tensorflow/tensorflow#72388):

    - ``fit`` first builds the model from ``strategy.reduce("MEAN", batch)`` of the distributed
      batch, which fails when the replicas got batches of different sizes (a dataset's last
      batch) and, on several workers, on any structure of batches. The build only needs shapes:
      it now uses this replica's batch.
    - On several workers the per-step logs are reduced with ``reduce("MEAN", v, axis=0)``, which
      fails on scalars (``Invalid reduction dimension 0 for input with 0 dimensions``). The logs
      are metric results, already aggregated across workers: they are averaged over replicas
      (``axis=None``) instead.

    Patched only inside this context and only under a strategy; a no-op otherwise.
    """
    if not is_distributed(strategy):
        yield
        return
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    original_reduce = trainer.reduce_per_replica
    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    multi_worker = is_multi_worker(strategy)

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def reduce_per_replica(values, strat, reduction):
        if multi_worker and reduction in ("auto", "mean"):
            return tree.map_structure(
                lambda v: (
                    strat.reduce("MEAN", v, axis=None)
                    if isinstance(v, tf.distribute.DistributedValues)
                    else v
                ),
                values,
            )
        return original_reduce(values, strat, reduction)

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:  # built outside a scope: Keras defers the build
            return original_build(self, iterator, data_batch)
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(local, next(it))
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    try:
        yield
    finally:
        trainer.reduce_per_replica = original_reduce
        trainer.TensorFlowTrainer._maybe_symbolic_build = original_build
