"""The supermask family: SupSup, ExSSNeT, WSN and PackNet over masked layers swapped into any model.

``layers`` holds the masked Linear / Conv2d and per-task batch-norm, ``base`` what the four share (mask
caching, task inference, storage accounting, the frozen-weight guard), and one module per method.
"""
