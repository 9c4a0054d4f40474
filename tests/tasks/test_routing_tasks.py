"""The multi-task proxy's data (`moejax.tasks.routing_tasks`)."""

import numpy as np
import pytest

from moejax.tasks import routing_tasks as rt


def test_batches_hold_each_tasks_answer_after_the_separator():
    config = rt.RoutingTasksConfig(num_symbols=5, length=4)
    batch = rt.routing_tasks_batch(config, 200, np.random.default_rng(0))
    inputs, targets = batch["inputs"], batch["targets"]
    assert inputs.shape == targets.shape == (200, config.seq_len)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(inputs[:, 0], config.num_symbols + 1 + batch["task"])
    x = inputs[:, 1 : 1 + config.length]
    separator = inputs[:, 1 + config.length]
    answer = targets[batch["loss_mask"]].reshape(200, config.length)
    np.testing.assert_array_equal(separator, config.separator)
    expected = {"copy": x, "reverse": x[:, ::-1], "increment": (x + 1) % config.num_symbols}
    for index, name in enumerate(config.tasks):
        rows = batch["task"] == index
        assert rows.any()
        np.testing.assert_array_equal(answer[rows], expected[name][rows])
    # The prompt is the task token and the content; the answer is never in it.
    assert batch["prompt_mask"][0].tolist() == [True] * (config.length + 1) + [False] * (
        config.length
    )
    assert not np.any(batch["prompt_mask"] & batch["loss_mask"])
    assert inputs.max() < config.vocab_size


@pytest.mark.parametrize(
    ("field", "value"), [("num_symbols", 1), ("length", 0), ("tasks", ("copy", "sort"))]
)
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field}: got .*; allowed"):
        rt.RoutingTasksConfig(**{field: value})
