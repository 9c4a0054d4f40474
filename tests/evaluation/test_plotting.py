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
