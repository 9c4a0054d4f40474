"""Images without a plotting library: an 8-bit RGB PNG encoder and a line plot on a numpy canvas.

Used for the expert-load heatmap (`moejax.metrics.save_load_heatmap`) and the router
comparison's validation curves; matplotlib is not a dependency.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_png(rgb: np.ndarray, path: str | Path) -> None:
    """Writes `rgb` ([height, width, 3] uint8) as an 8-bit RGB PNG, unfiltered, zlib alone."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.size == 0:
        raise ValueError(f"rgb: expected non-empty [height, width, 3] uint8, got {rgb.shape}")
    height, width, _ = rgb.shape
    # Each scanline starts with its filter type; 0 stores the bytes as they are.
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def nice_step(span: float, lines: int = 6) -> float:
    """A round grid spacing (1, 2, 2.5 or 5 times a power of ten) giving at most `lines` lines."""
    raw = max(span, 1e-12) / lines
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw)


@dataclasses.dataclass(frozen=True)
class _Box:
    """The plot area in pixels and the data range it shows."""

    left: int
    top: int
    right: int
    bottom: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        px = self.left + (np.asarray(x) - x0) / (x1 - x0) * (self.right - self.left)
        py = self.bottom - (np.asarray(y) - y0) / (y1 - y0) * (self.bottom - self.top)
        return px, py

    def paint(self, canvas: np.ndarray, px: np.ndarray, py: np.ndarray, color) -> None:
        """Sets the pixels at (px, py) that lie inside the box: lines are clipped to it."""
        px, py = np.rint(px).astype(int), np.rint(py).astype(int)
        inside = (px >= self.left) & (px <= self.right) & (py >= self.top) & (py <= self.bottom)
        canvas[py[inside], px[inside]] = color


def _segment(p0: tuple[float, float], p1: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Points one pixel apart along the segment from p0 to p1."""
    count = int(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1]))) + 2
    t = np.linspace(0.0, 1.0, count)
    return p0[0] + t * (p1[0] - p0[0]), p0[1] + t * (p1[1] - p0[1])


def plot_curves(
    curves: dict[str, Sequence[Sequence[float]]],
    colors: dict[str, tuple[int, int, int]],
    path: str | Path,
    *,
    width: int = 800,
    height: int = 500,
    margin: int = 30,
) -> dict[str, Any]:
    """Draws one polyline per curve ([[step, value], ...]) in its colour and writes a PNG.

    The y axis spans the values after step 0 (an untrained model's ~8 bits/byte would flatten
    everything else); segments from step 0 are clipped at the top. Light grey grid lines sit at
    round values. Returns the axes (ranges and grid spacing), since the image has no text.
    """
    canvas = np.full((height, width, 3), 255, np.uint8)
    points = [(float(s), float(v)) for curve in curves.values() for s, v in curve]
    later = [v for s, v in points if s > 0] or [v for _, v in points] or [0.0, 1.0]
    low, high = min(later), max(later)
    pad = 0.05 * (high - low) if high > low else 0.05
    x_max = max((s for s, _ in points), default=1.0) or 1.0
    box = _Box(
        margin, margin, width - margin, height - margin, (0.0, x_max), (low - pad, high + pad)
    )
    x_grid, y_grid = nice_step(x_max), nice_step(high - low + 2 * pad)
    light = (225, 225, 225)
    for x in np.arange(x_grid, x_max, x_grid):
        px, _ = box.to_pixels(np.array([x]), np.array([low]))
        rows = np.arange(box.top, box.bottom + 1)
        box.paint(canvas, np.full(rows.shape, px[0]), rows, light)
    for y in np.arange(math.ceil((low - pad) / y_grid) * y_grid, high + pad, y_grid):
        _, py = box.to_pixels(np.array([0.0]), np.array([y]))
        cols = np.arange(box.left, box.right + 1)
        box.paint(canvas, cols, np.full(cols.shape, py[0]), light)
    canvas[box.top, box.left : box.right + 1] = 0
    canvas[box.bottom, box.left : box.right + 1] = 0
    canvas[box.top : box.bottom + 1, box.left] = 0
    canvas[box.top : box.bottom + 1, box.right] = 0
    for name, curve in curves.items():
        if not curve:
            continue
        steps, values = np.asarray(curve, np.float64).T
        px, py = box.to_pixels(steps, values)
        vertices = list(zip(px, py, strict=True))
        for p0, p1 in zip(vertices[:-1], vertices[1:], strict=True):
            xs, ys = _segment(p0, p1)
            for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
                box.paint(canvas, xs + dx, ys + dy, colors[name])
        for x, y in vertices:
            for dx in range(-2, 3):
                box.paint(canvas, np.full(5, x + dx), y + np.arange(-2, 3), colors[name])
    write_png(canvas, path)
    return {
        "steps": [0.0, x_max],
        "bits_per_byte": [low - pad, high + pad],
        "step_grid": x_grid,
        "bits_per_byte_grid": y_grid,
    }
