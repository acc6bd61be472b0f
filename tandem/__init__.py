"""Tandem: serve large language models across GPUs and machines."""

import os

# torch's OpenMP threads spin while they wait for work. When any other thread wants the same
# cores (our own event loop, a tokenizer, another process) the spinning starves it and small
# matmuls slow down a hundredfold. Passive waiting costs little when the cores are free.
# OpenMP reads this once, when torch is first imported: so it is set here, before any torch
# import of ours, and only if the user has not chosen otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
