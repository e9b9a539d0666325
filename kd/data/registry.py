"""The registry of built-in data sets (name -> factory returning ``(x, y)``)."""

from kd.plugins import Registry

DATASETS = Registry("dataset")
