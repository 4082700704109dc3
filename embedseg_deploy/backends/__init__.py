"""Inference backends behind one small interface (see embedseg_deploy.backends.base)."""
