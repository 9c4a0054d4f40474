"""When train.py and eval.py join a distributed system, and the errors for flags that cannot."""

import pytest

from moejax import distributed
from moejax.distributed import DistributedError, Launch

SLURM_TWO_TASKS = {"SLURM_JOB_ID": "123", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}


@pytest.mark.parametrize(
    ("environ", "tpu_vm", "kind"),
    [
        ({}, False, "single"),
        (SLURM_TWO_TASKS, False, "slurm"),
        (SLURM_TWO_TASKS | {"SLURM_STEP_NUM_TASKS": "1"}, False, "single"),
        ({"SLURM_JOB_ID": "123", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, False, "single"),
        ({"SLURM_JOB_ID": "123", "SLURM_NTASKS": "4"}, False, "single"),  # sbatch's own shell
        ({}, True, "cloud_tpu"),
        ({"TPU_SKIP_MDS_QUERY": "1"}, True, "single"),
    ],
)
def test_detect(environ, tpu_vm, kind):
    assert distributed.detect(environ, tpu_vm=tpu_vm) == kind


def test_explicit_flags_win_over_detection():
    launch = distributed.plan("10.0.0.1:1234", 4, 3, environ=SLURM_TWO_TASKS, tpu_vm=True)
    assert launch == Launch("explicit", "10.0.0.1:1234", 4, 3)


def test_no_flags_take_the_detected_cluster():
    assert distributed.plan(None, None, None, environ=SLURM_TWO_TASKS, tpu_vm=False).kind == (
        "slurm"
    )
    assert distributed.plan(None, None, None, environ={}, tpu_vm=False) == Launch("single")


def test_single_process_flag_overrides_detection():
    launch = distributed.plan(
        None, None, None, single_process=True, environ=SLURM_TWO_TASKS, tpu_vm=True
    )
    assert launch == Launch("single")


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("localhost:1", 2, None), {}, "without --process_id"),
        ((None, 2, 0), {}, "without --coordinator_address"),
        (("localhost", 2, 0), {}, "'localhost': expected HOST:PORT"),
        (("localhost:0", 2, 0), {}, "port in 1..65535"),
        (("localhost:70000", 2, 0), {}, "port in 1..65535"),
        (("localhost:1234", 0, 0), {}, "--num_processes 0: must be at least 1"),
        (("localhost:1234", 2, 2), {}, r"--process_id 2: must be in \[0, --num_processes=2\)"),
        (("localhost:1234", 2, -1), {}, "--process_id -1"),
        (("localhost:1234", 2, 0), {"single_process": True}, "--single_process with"),
    ],
)
def test_impossible_launches_are_errors_naming_the_flag(args, kwargs, message):
    with pytest.raises(DistributedError, match=message):
        distributed.plan(*args, environ={}, tpu_vm=False, **kwargs)


def test_single_process_launches_do_not_initialise(monkeypatch):
    import jax

    def refuse(**_):
        raise AssertionError("jax.distributed.initialize called")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    distributed.initialize(Launch("single"))
    distributed.initialize(Launch("explicit", "localhost:1234", 1, 0))


def test_train_py_reports_a_bad_launch_flag_with_status_2(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "train.py"
    spec = importlib.util.spec_from_file_location("moejax_train_cli", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.main(["--num_processes", "2"]) == 2
    assert "--num_processes given without --coordinator_address" in capsys.readouterr().err


def test_agreement_helpers_in_one_process():
    assert distributed.all_processes(True) and not distributed.all_processes(False)
    assert distributed.all_processes_equal("anything")
    distributed.barrier("nothing to wait for")
