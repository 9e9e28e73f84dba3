"""workflows: what the scripts call: train, evaluate, export, report, compare, sweep

The top layer: it may import every other one.
"""
