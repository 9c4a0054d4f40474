"""Figures: what the reader sees (labels, colour bar, legend) from the Figure objects, and the
PNG files read back."""

import matplotlib.image
import numpy as np
import pytest

from moejax import plotting


def _loads(layers: int, experts: int) -> np.ndarray:
    return np.random.default_rng(0).dirichlet(np.ones(experts), size=layers)


def test_load_heatmap_labels_axes_and_colour_bar_and_shows_the_loads():
    loads = _loads(2, 6)
    figure = plotting.load_heatmap(loads, layer_names=["1", "3"], title="Expert load, step 7")
    heatmap, colour_bar = figure.axes
    assert heatmap.get_xlabel() == "expert" and heatmap.get_ylabel() == "MoE layer"
    assert heatmap.get_title() == "Expert load, step 7"
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["1", "3"]
    assert colour_bar.get_ylabel() == "share of routed tokens"
    (image,) = heatmap.get_images()
    np.testing.assert_array_equal(image.get_array(), loads)  # rows: layers, columns: experts
    assert image.get_clim() == (0.0, 2.0 / 6)  # balanced load sits mid-scale


@pytest.mark.parametrize(
    ("loads", "kwargs", "match"),
    [
        (np.ones(4), {}, "loads"),
        (np.ones((2, 4)), {"layer_names": ["0"]}, "layer_names"),
        (np.ones((2, 4)), {"vmax": 0.0}, "vmax"),
    ],
)
def test_load_heatmap_rejects_bad_arguments_by_name(loads, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plotting.load_heatmap(loads, **kwargs)


def test_curves_figure_draws_one_labelled_line_per_curve_in_its_colour():
    curves = {"ticket": [[0, 0.8], [1, 0.85]], "random": [[0, 0.8], [1, 0.7]], "empty": []}
    figure = plotting.curves_figure(
        curves,
        title="accuracy",
        xlabel="round",
        ylabel="test accuracy",
        colors={"ticket": (255, 0, 0), "random": (0, 0, 255), "empty": (0, 0, 0)},
        y_range=(0.6, 0.9),
    )
    (axes,) = figure.axes
    assert (axes.get_xlabel(), axes.get_ylabel(), axes.get_title()) == (
        "round",
        "test accuracy",
        "accuracy",
    )
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) == {"ticket", "random"}
    np.testing.assert_array_equal(lines["random"].get_ydata(), [0.8, 0.7])
    assert lines["ticket"].get_color() == (1.0, 0.0, 0.0)
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["ticket", "random"]
    assert axes.get_ylim() == (0.6, 0.9)


def test_png_reads_back_as_the_rendered_figure_and_is_byte_for_byte_repeatable(tmp_path):
    figure = plotting.load_heatmap(_loads(3, 4))
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    plotting.save_png(figure, first)
    plotting.save_png(plotting.load_heatmap(_loads(3, 4)), second)
    assert first.read_bytes() == second.read_bytes()
    assert b"Matplotlib" not in first.read_bytes()  # no version string in the metadata
    pixels = matplotlib.image.imread(first)  # [height, width, 4] floats in [0, 1]
    rgb = plotting.figure_rgb(figure)
    width, height = figure.get_size_inches() * figure.dpi
    assert rgb.shape == (round(height), round(width), 3) and rgb.dtype == np.uint8
    assert pixels.shape[:2] == rgb.shape[:2]
    np.testing.assert_array_equal(np.rint(pixels[..., :3] * 255).astype(np.uint8), rgb)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # not blank: a colour map and text


LONG = "a label much longer than the figure is wide, as a run's name or a config can make it " * 2


def _texts_off_the_canvas(figure) -> list[str]:
    """Every title, axis label, tick label and legend entry of `figure` that is drawn at least in
    part outside its canvas, measured by the renderer that draws it."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    canvas = figure.bbox
    texts = []
    for axes in figure.axes:
        texts += [axes.title, axes._left_title, axes._right_title]
        for axis in (axes.xaxis, axes.yaxis):
            texts += [axis.label, axis.get_offset_text()]
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks():
                if low - 1e-9 <= tick.get_loc() <= high + 1e-9:  # the ticks that are drawn
                    texts += [tick.label1, tick.label2]
        if axes.get_legend() is not None:
            texts += axes.get_legend().get_texts()
    drawn = [text for text in texts if text.get_visible() and text.get_text()]
    assert len(drawn) > 4, "found no texts to check"
    off = []
    for text in drawn:
        extent = text.get_window_extent(renderer)
        if (
            extent.x0 < canvas.x0 - 0.5
            or extent.y0 < canvas.y0 - 0.5
            or extent.x1 > canvas.x1 + 0.5
            or extent.y1 > canvas.y1 + 0.5
        ):
            off.append(f"{text.get_text()[:40]!r} at {extent.bounds} on {canvas.bounds}")
    return off


FIGURES = {
    # eval.py's heatmap for the default run: its title ran off the left edge.
    "heatmap, the default run": lambda: plotting.load_heatmap(
        _loads(2, 8),
        layer_names=["1", "3"],
        title="Expert load on the validation batches, step 1600",
    ),
    "heatmap, 2 experts, long title and layer names": lambda: plotting.load_heatmap(
        _loads(3, 2), layer_names=[f"{LONG[:60]} {i}" for i in range(3)], title=LONG
    ),
    "heatmap, 128 experts, 48 layers": lambda: plotting.load_heatmap(_loads(48, 128), title=LONG),
    "curves, long title, labels and names": lambda: plotting.curves_figure(
        {f"{LONG[:70]} {i}": [[0, 1e6 * i], [1e7, 2e6 * i]] for i in range(6)},
        title=LONG,
        xlabel=LONG,
        ylabel=LONG[:120],
    ),
    "curves, short": lambda: plotting.curves_figure(
        {"ticket": [[0, 0.8], [1, 0.85]]}, title="accuracy", xlabel="round", ylabel="accuracy"
    ),
}


@pytest.mark.parametrize("make", FIGURES.values(), ids=FIGURES.keys())
def test_every_title_label_and_tick_label_lies_on_the_canvas(make):
    assert _texts_off_the_canvas(make()) == []
