"""fitting: ``TrainConfig`` and phases, the one runner, the frozen cut and feature cache, the head
solver, optimizers, the LR finder, tf.distribute, source pre-training, the run directory.

Sits on ``models`` and ``data``.
"""
