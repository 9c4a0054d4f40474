"""Figures for reports and TensorBoard: the expert-load heatmap and line plots of curves.

Drawn on matplotlib `Figure`s with the Agg canvas: no display, no pyplot and its global state,
so nothing here changes the backend of a notebook that imports it. `save_png` writes a figure
with no timestamp or version in the file (the same figure gives the same bytes);
`figure_rgb` renders one to pixels for `MetricsWriter.write_image`. Every figure is laid out
so that its texts (titles, axis and tick labels, legend) lie on the canvas, however long they
are (`_fit_texts`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from os import PathLike

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def load_heatmap(
    loads: np.ndarray,
    *,
    layer_names: Sequence[str] | None = None,
    vmax: float | None = None,
    title: str = "Expert load",
) -> Figure:
    """One row per MoE layer, one column per expert, coloured by the share of routed tokens.

    Args:
      loads: [layers, num_experts] load fractions, e.g. each layer's "expert_load".
      layer_names: a tick label per row (default 0, 1, ...).
      vmax: the load drawn in the top colour (default 2 / num_experts, so balanced load sits
        mid-scale and figures from different steps share one scale; larger loads saturate).
      title: the figure's title.
    """
    loads = np.asarray(loads, np.float64)
    if loads.ndim != 2 or loads.size == 0:
        raise ValueError(f"loads: expected a non-empty [layers, num_experts], got {loads.shape}")
    layers, experts = loads.shape
    if layer_names is not None and len(layer_names) != layers:
        raise ValueError(f"layer_names: got {len(layer_names)} names for {layers} layers")
    vmax = 2.0 / experts if vmax is None else vmax
    if not vmax > 0:
        raise ValueError(f"vmax: got {vmax}; allowed: > 0")
    figure = Figure(figsize=(max(4.0, 1.0 + 0.35 * experts), max(2.5, 1.2 + 0.4 * layers)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(loads, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    axes.set_xticks(range(experts))
    axes.set_yticks(range(layers), labels=layer_names or [str(i) for i in range(layers)])
    axes.tick_params(axis="x", labelsize=7 if experts > 16 else 9)
    axes.set_xlabel("expert")
    axes.set_ylabel("MoE layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="share of routed tokens", extend="max")
    _fit_texts(figure)
    return figure


def curves_figure(
    curves: Mapping[str, Sequence[Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colors: Mapping[str, tuple[int, int, int]] | None = None,
    y_range: tuple[float, float] | None = None,
) -> Figure:
    """One line with markers per curve (`[[x, y], ...]`), labelled by its name in a legend.

    `colors`: 8-bit RGB per curve name (default matplotlib's cycle). `y_range`: the y limits
    (default fitted to every point); points outside are clipped at the frame.
    """
    figure = Figure(figsize=(8.0, 5.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, curve in curves.items():
        if not len(curve):
            continue
        x, y = np.asarray(curve, np.float64).T
        color = None if colors is None else tuple(c / 255 for c in colors[name])
        axes.plot(x, y, marker="o", markersize=3, color=color, label=name)
    if y_range is not None:
        axes.set_ylim(*y_range)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, color="0.9")
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    _fit_texts(figure)
    return figure


def _fit_texts(figure: Figure, *, pad_inches: float = 0.05, rounds: int = 5) -> None:
    """Lays `figure` out so that everything drawn, text included, lies on its canvas.

    `tight_layout` shrinks the axes to make room for the labels around them, but it cannot fit
    a text longer than the figure itself (a long title over a narrow heatmap ran off the left
    and right edges). So the laid-out figure is measured with the renderer and, where anything
    still overflows, grown by the overflow and laid out again. The layout is computed here,
    once: drawing the figure later (`save_png`, `figure_rgb`) does not repeat it.
    """
    for _ in range(rounds):
        with warnings.catch_warnings():
            # A text longer than the figure leaves no room for the axes on the way: grown below.
            warnings.filterwarnings("ignore", "Tight layout not applied")
            figure.tight_layout()
        extent = figure.get_tightbbox(figure.canvas.get_renderer())  # inches
        width, height = figure.get_size_inches()
        grow_x = max(0.0, -extent.x0) + max(0.0, extent.x1 - width)
        grow_y = max(0.0, -extent.y0) + max(0.0, extent.y1 - height)
        if grow_x == 0.0 and grow_y == 0.0:
            return
        figure.set_size_inches(
            width + (grow_x + 2 * pad_inches if grow_x else 0.0),
            height + (grow_y + 2 * pad_inches if grow_y else 0.0),
        )
    figure.tight_layout()


def save_png(figure: Figure, path: str | PathLike[str], *, dpi: int = 100) -> None:
    """Writes `figure` as a PNG without the matplotlib version in its metadata."""
    figure.savefig(path, format="png", dpi=dpi, metadata={"Software": None})


def figure_rgb(figure: Figure) -> np.ndarray:
    """The figure rendered at its own dpi: [height, width, 3] uint8."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
