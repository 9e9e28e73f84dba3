"""fitting: TrainConfig and phases, the runner, the feature cache, optimizers, the run dir

Sits on ``models`` and ``data``.

- ``config``: ``TrainConfig`` and ``Phase``; ``plan``: the phases of a run (gradual unfreezing, the
  schedule).
- ``compiling``: the one compile step; ``runner``: ``run_phase``, the one place a model is fit.
- ``frozen``, ``feature_cache``, ``fast_path``, ``head_solver``: the fast frozen path (the cut,
  the cached features, the trainer on them, the solved head).
- ``optimizers``: per-block learning rates, schedules, EMA; ``lr_finder``: the LR range test.
- ``distribute``: tf.distribute; ``pretrain``: ``source:`` weights, pre-trained here.
- ``loading``: ``load_and_build``, data and model from what a caller asked for.
- ``run``, ``rundir``, ``reports``: a resumable run directory, its files, plots and summary;
  ``evaluation``: a trained model's predictions of a split and its pooled features, one pass.
"""
