"""Scalar metrics to TensorBoard event files and to a JSONL file (one object per line); images
(figures rendered by `moejax.plotting.figure_rgb`) to TensorBoard alone."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalars stay; a vector `name [n]` becomes `name/0 ... name/{n-1}`."""
    flat = {}
    for name, value in metrics.items():
        array = np.asarray(value, dtype=np.float64)
        if array.ndim == 0:
            flat[name] = float(array)
        else:
            for index, item in enumerate(array.reshape(-1)):
                flat[f"{name}/{index}"] = float(item)
    return flat


class MetricsWriter:
    """Writes `split/name` scalars to `<workdir>/tensorboard` and `<workdir>/metrics.jsonl`."""

    def __init__(
        self, workdir: str | Path, *, process_index: int = 0, purge_step: int | None = None
    ):
        """`purge_step`: the first step a resumed run writes again; TensorBoard hides the
        events of the earlier attempt from that step on (the JSONL file is trimmed apart)."""
        self.enabled = process_index == 0
        workdir = Path(workdir)
        self.jsonl_path = workdir / "metrics.jsonl"
        self.tensorboard_dir = workdir / "tensorboard"
        if self.enabled:
            self._tb = SummaryWriter(logdir=str(self.tensorboard_dir), purge_step=purge_step)
            self._jsonl = self.jsonl_path.open("a")

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> dict[str, float]:
        flat = flatten_metrics(metrics)
        if not self.enabled:
            return flat
        for name, value in flat.items():
            if math.isfinite(value):
                self._tb.add_scalar(f"{split}/{name}", value, global_step=step)
        record = {"step": step, "split": split}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in flat.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        return flat

    def write_image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        """Logs `rgb` ([height, width, 3] uint8) as the TensorBoard image `tag` at `step`."""
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"rgb: expected [height, width, 3] uint8, got {rgb.shape} {rgb.dtype}")
        if self.enabled:
            self._tb.add_image(tag, rgb, global_step=step, dataformats="HWC")
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
