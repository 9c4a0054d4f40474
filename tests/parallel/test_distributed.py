"""When train.py and eval.py join a distributed system, and the errors for flags that cannot."""

import collections
import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest

from moejax.parallel import distributed
from moejax.parallel.distributed import ABSENT, DistributedError, Launch, flatten
from moejax.training.workdir import WorkdirError

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

    path = Path(__file__).resolve().parents[2] / "train.py"
    spec = importlib.util.spec_from_file_location("moejax_train_cli", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.main(["--num_processes", "2"]) == 2
    assert "--num_processes given without --coordinator_address" in capsys.readouterr().err


def _tiny(*overrides: str):
    from moejax import config as config_lib

    config = config_lib.load_config_file(Path(__file__).resolve().parents[2] / "configs/tiny.py")
    return config_lib.apply_overrides(config, list(overrides))


def test_differences_name_the_dotted_path_of_each_differing_nested_field():
    base = _tiny()
    changed = _tiny("model.moe.num_experts=8", "attention.kind=local", "model.router.name=top_p")
    found = distributed.differences([base, changed, base])
    assert found == {
        "model.moe.num_experts": [4, 8, 4],
        "model.router.name": ["softmax_top_k", "top_p", "softmax_top_k"],
        # Options only the top_p router has: absent from the other processes' configs.
        "model.router.options.top_p": [ABSENT, 0.4, ABSENT],
        "model.router.options.entropy_weight": [ABSENT, 0.0001, ABSENT],
        "attention.kind": ["dense", "local", "dense"],
        # Likewise the options only the local attention kind has.
        "attention.options.window": [ABSENT, 256, ABSENT],
    }
    assert distributed.differences([base, _tiny()]) == {}


def test_differences_read_nested_mappings_as_they_arrive_from_json():
    process0 = {"remainder_slices": {"row": [231, 4093]}, "epoch": 0}
    process1 = {"remainder_slices": {"row": [495, 4093]}, "epoch": 0, "extra": None}
    assert distributed.differences([process0, process1]) == {
        "remainder_slices.row": [[231, 4093], [495, 4093]],
        "extra": [ABSENT, None],
    }


def test_describe_differences_names_processes_by_value_in_one_line():
    found = {
        "model.moe.num_experts": [4, 8, 4, 4, 4, 8, 4],
        "attention.kind": ["dense", "dense", ABSENT, "dense", "dense", "dense", "dense"],
    }
    assert distributed.describe_differences(found) == (
        "model.moe.num_experts: processes 0, 2-4, 6 have 4, processes 1, 5 have 8; "
        "attention.kind: processes 0, 1, 3-6 have 'dense', process 2 has nothing"
    )
    many = {f"code/file{i}.py": ["a", "b"] for i in range(12)}
    described = distributed.describe_differences(many, limit=3)
    assert described.endswith("code/file2.py: process 0 has 'a', process 1 has 'b'; and 9 more")


class _KeyValueStore:
    """The coordination service's key-value store as one process of `num_processes` sees it;
    the other processes' entries are put in by the test."""

    def __init__(self, num_processes: int):
        self.client, self.process_id, self.num_processes = self, 0, num_processes
        self.entries: dict[str, str] = {}

    def key_value_set(self, key: str, value: str) -> None:
        assert key not in self.entries, f"{key} set twice"
        self.entries[key] = value

    def blocking_key_value_get(self, key: str, timeout_in_ms: int) -> str:
        if key not in self.entries:
            import jax

            raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out: {key}")
        return self.entries[key]


@pytest.fixture
def two_processes(monkeypatch):
    """This process as process 0 of two, over `_KeyValueStore`; exchange counts start afresh."""
    store = _KeyValueStore(2)
    monkeypatch.setattr(distributed, "_coordination", lambda: store)
    monkeypatch.setattr(distributed, "_exchanges", collections.Counter())
    return store


def _from_process_1(store: _KeyValueStore, name: str, entry: dict, exchange: int = 1) -> None:
    store.entries[f"moejax/{name}/{exchange}/1"] = json.dumps(entry)


def test_an_agreement_names_the_fields_another_process_has_otherwise(two_processes):
    changed = _tiny("model.moe.num_experts=8")
    _from_process_1(two_processes, "start-up", {"values": {"config": flatten(changed)}})
    with (
        pytest.raises(DistributedError) as error,
        distributed.Agreement("start-up", remedy="Start them alike") as start,
    ):
        start.compare("config", _tiny())
    assert str(error.value) == (
        "config differs between processes: model.moe.num_experts: process 0 has 4, "
        "process 1 has 8. Start them alike"
    )
    entry = json.loads(two_processes.entries["moejax/start-up/1/0"])
    assert entry["values"]["config"]["model.moe.num_experts"] == 4


def test_an_agreement_passes_on_another_process_s_error(two_processes):
    _from_process_1(two_processes, "lock", {"error": "workdir error: held by pid 7"})
    with (
        pytest.raises(DistributedError, match=r"^lock: process 1 stopped: workdir error: held"),
        distributed.Agreement("lock") as lock,
    ):
        lock.compare("config", _tiny())


def test_an_agreement_tells_the_others_this_process_s_error_and_raises_it(two_processes):
    with pytest.raises(WorkdirError, match="held"), distributed.Agreement("lock"):
        raise WorkdirError("--workdir run: held")
    told = json.loads(two_processes.entries["moejax/lock/1/0"])
    assert told == {"error": "workdir error: --workdir run: held"}


def test_an_agreement_in_agreement_passes_and_the_next_uses_new_keys(two_processes):
    for exchange in (1, 2):
        _from_process_1(two_processes, "save", {"values": {"data": {"epoch": 3}}}, exchange)
        with distributed.Agreement("save") as save:
            save.compare("data", {"epoch": 3})
    assert sorted(two_processes.entries) == [
        "moejax/save/1/0",
        "moejax/save/1/1",
        "moejax/save/2/0",
        "moejax/save/2/1",
    ]


def test_a_process_that_never_arrives_is_an_error_naming_it(two_processes):
    with pytest.raises(DistributedError, match=r"^save: process 1 did not get there within 1 s"):
        distributed.gather("save", "{}", timeout_s=1)


def test_an_agreement_in_one_process_only_runs_the_block():
    with distributed.Agreement("start-up") as start:
        start.compare("config", _tiny())
    with pytest.raises(WorkdirError), distributed.Agreement("start-up"):
        raise WorkdirError("refused")
    assert distributed.gather("anything", "text") == ["text"]
    distributed.barrier("nothing to wait for")


def test_code_version_digests_every_source_file_and_names_the_libraries():
    version = distributed.code_version()
    source = Path(distributed.__file__)
    assert (
        version["moejax/parallel/distributed.py"]
        == hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    )
    assert "kernels_pallas/__init__.py" in version
    assert not [name for name in version if "__pycache__" in name]
    assert version["jax"] == importlib.metadata.version("jax")
