"""embedseg_training: data, BranchedERFNet, spatial-embedding loss and the training loop (needs torch)."""

__version__ = "0.1.0"
