"""Loaded by every Python process started with this folder on PYTHONPATH: see forward_counter."""

import os

if os.environ.get("COUNT_FORWARDS"):
    import forward_counter

    forward_counter.install()
