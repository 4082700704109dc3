"""Option choices and defaults of the exporters that the CLI needs before torch or onnx are imported.

``embedseg-export --help`` must work on a runtime-only install, so these live apart from :mod:`.fp16`
(which needs onnx) and are re-exported there.
"""

KEEP_CHOICES = ("heads", "bn", "first")  # the parts an fp16 model may keep in fp32; see fp16.py
DEFAULT_KEEP = ("heads", "bn")
