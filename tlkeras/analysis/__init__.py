"""analysis: calibration, Grad-CAM, test-time augmentation, the data audit, the advisor

Measures models and data; never trains a model it keeps. Sits on ``fitting`` and below.
"""
