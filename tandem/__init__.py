"""Tandem: serve large language models across GPUs and machines."""

__version__ = "0.1.0"
