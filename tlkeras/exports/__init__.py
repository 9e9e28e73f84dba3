"""exports: the export layout, serving signatures, SavedModel writing, fresh-process verification,
edge formats (TFLite, ONNX), loading an export.

Sits on ``analysis`` (calibration, Grad-CAM and TTA go into the signatures) and below.
"""
