"""The checkpoint conversion command: `python -m weights_converter IN OUT` (see `__main__.py`).

The reading of CompVis checkpoints lives in `sd.checkpoint`; this package only adds the command line.
"""
