"""A tiny PNG writer (zlib + struct) for label overlays, so the runtime needs no imaging library."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .io import atomic_write_bytes


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image (8-bit RGB, no filtering)."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"need an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter byte 0
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write ``rgb`` as PNG atomically (temp file, then rename)."""
    return atomic_write_bytes(path, encode_png(rgb))


def label_colours(n: int, seed: int = 7) -> np.ndarray:
    """(n + 1, 3) uint8 colours: black for 0, bright random hues for labels 1..n."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(60, 256, size=(n + 1, 3)).astype(np.uint8)
    colours[0] = 0
    return colours


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An RGB overlay of 2D ``labels`` on a contrast-stretched grey ``image``; object borders drawn solid."""
    img = np.asarray(image, np.float64)
    lo, hi = np.percentile(img, [1, 99.8])
    grey = np.clip((img - lo) / (hi - lo + 1e-20), 0, 1)
    rgb = np.repeat((grey * 255)[..., None], 3, axis=2)
    labels = np.asarray(labels)
    colours = label_colours(int(labels.max()) if labels.size else 0).astype(np.float64)
    inside = labels > 0
    rgb[inside] = (1 - alpha) * rgb[inside] + alpha * colours[labels[inside]]
    border = np.zeros_like(inside)
    border[:-1] |= labels[:-1] != labels[1:]
    border[1:] |= labels[1:] != labels[:-1]
    border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    border &= inside
    rgb[border] = colours[labels[border]]
    return np.clip(rgb, 0, 255).astype(np.uint8)
