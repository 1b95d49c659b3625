"""Datasets (TFDS builders, no TensorFlow needed) and grain training batches.

Every captioned dataset has the features ``image`` (uint8 HxWx3) and
``captions`` (one or more strings); ``loader`` picks one caption per
example and epoch.
"""
