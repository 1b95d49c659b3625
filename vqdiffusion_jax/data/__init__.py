"""Datasets (TFDS builders, no TensorFlow needed) and the grain input pipeline.

Every captioned dataset has the features ``image`` (uint8 HxWx3) and
``captions`` (one or more strings); the input pipeline picks one caption per
example and epoch.
"""
