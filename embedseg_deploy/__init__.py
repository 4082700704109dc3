"""embedseg-deploy runtime: torch-free tiled 2D/3D EmbedSeg inference, clustering and evaluation."""

__version__ = "0.1.0"
