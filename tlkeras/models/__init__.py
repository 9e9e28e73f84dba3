"""models: the backbone table, blocks, strategies, head tasks, the model builder, weights=

The bottom layer: it imports no other tlkeras layer.
"""
