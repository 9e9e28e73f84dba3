"""workflows: what the scripts call, about one module per script: a training run, evaluation,
export of a run, the report, strategy comparison, the sweep.

The top layer: it may import every other one.
"""
