"""The napari plugin (npe2, manifest ``napari.yaml``): a segmentation widget, a reader for embedseg-run's
label images and the demo image as sample data. It imports only the torch-free runtime.

The numerics and state live in :mod:`.session` (no Qt); :mod:`.widget` is the Qt face over it.
"""
