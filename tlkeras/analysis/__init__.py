"""analysis: calibration, Grad-CAM, test-time augmentation, the data audit, the advisor

Measures models and data; never trains a model it keeps. Sits on ``fitting`` and below.

- ``calibration``: calibration error, temperature scaling, withholding low scores.
- ``gradcam``: where in the image the evidence for a class lies.
- ``tta``: test-time augmentation.
- ``audit``, ``audit_probes``, ``audit_result``: the data audit (near-duplicates, leaks, mislabels).
- ``advisor``, ``transferability``: which strategy and backbone, from measurements.
- ``inputs``: an ``ImageData`` as it is, or loaded.
"""
