"""workflows: what the scripts call: train, evaluate, export, report, compare, sweep

The top layer: it may import every other one.

- ``training``: ``fit`` and ``train`` (``scripts/train.py``); ``export_run``: a run's exports.
- ``evaluate``: score an export; ``report``, ``report_content``, ``report_html``: ``report.html``.
- ``transfer``: strategy comparison and the offline transfer story (``scripts/compare.py``).
- ``sweep``, ``sweep_report``: the freeze-point sweep (``scripts/sweep.py``).
"""
