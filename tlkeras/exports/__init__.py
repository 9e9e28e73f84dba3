"""exports: export layout, serving signatures, SavedModel, verification, edge, loading

Sits on ``analysis`` (calibration, Grad-CAM and TTA go into the signatures) and below.
"""
