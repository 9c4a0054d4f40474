"""A Hugging Face checkpoint directory on disk: config.json and its safetensors shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moejax.errors import UserError
from moejax.pretrained.safetensors import SafetensorsFile

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class Checkpoint:
    """The config and tensors of a checkpoint directory; a shard's header is read when one of
    its tensors is first asked for, and each tensor is read on its own."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: not a directory; give a Hugging Face checkpoint dir")
        config = self.path / "config.json"
        if not config.is_file():
            raise UserError(f"{self.path}: no config.json; a Hugging Face checkpoint has one")
        self.config = json.loads(config.read_text())
        self.files = self._index()
        self._open: dict[str, SafetensorsFile] = {}

    def _index(self) -> dict[str, str]:
        """Tensor name -> shard file name."""
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text()).get("weight_map", {})
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise UserError(
                    f"{self.path}: shard {missing[0]} named by {INDEX} is missing"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            return dict(weight_map)
        if (self.path / SINGLE).is_file():
            return {name: SINGLE for name in SafetensorsFile(self.path / SINGLE).names()}
        singles = sorted(p.name for p in self.path.glob("*.safetensors"))
        if singles:
            return {
                name: file for file in singles for name in SafetensorsFile(self.path / file).names()
            }
        if any((self.path / name).exists() for name in PICKLED) or list(self.path.glob("*.bin")):
            raise UserError(
                f"{self.path}: only pickled PyTorch .bin weights; moejax reads safetensors only "
                "(unpickling runs code from the file). Convert once where torch is installed: "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
                "safe_serialization=True)"
            )
        raise UserError(f"{self.path}: no safetensors weights ({SINGLE} or {INDEX})")

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self.files:
            raise UserError(
                f"{self.path}: tensor {name!r} is missing from the checkpoint; the config's "
                f"architecture ({self.config.get('model_type')}) needs it"
            )
        file = self.files[name]
        if file not in self._open:
            self._open[file] = SafetensorsFile(self.path / file)
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor `name` in its stored dtype."""
        return self._file(name).tensor(name)

    def close(self) -> None:
        self._open.clear()
