"""fitting: TrainConfig and phases, the runner, the feature cache, optimizers, the run dir

Sits on ``models`` and ``data``.
"""
