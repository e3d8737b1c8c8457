"""The sweep file's schema (``python -m train.sweep SWEEP.yaml``): base config, output directory, grid, random
draws, overrides, the trainer command and SLURM options, validated with one-line errors naming the key
(:func:`load_sweep`). What the sweep does with it: :mod:`train.sweep`.
"""
from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jzero.config import load_yaml
from jzero.errors import ConfigError

_RESERVED = ("train.output_dir",)   # keys the sweep sets itself for every point

# ----------------------------------------------------------------------------------------------------------
# the sweep file
# ----------------------------------------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RandomParam(_Model):
    """Exactly one of: ``choice: [...]``, ``uniform: [lo, hi]``, ``loguniform: [lo, hi]`` (lo > 0)."""

    choice: Optional[list] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice / uniform / loguniform, got {given or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        for k in ("uniform", "loguniform"):
            lo_hi = getattr(self, k)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{k}: [lo, hi] needs lo < hi, got {list(lo_hi)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs lo > 0, got {self.loguniform[0]}")
        return self

    def draw(self, rng: random.Random) -> Any:
        if self.choice is not None:
            return rng.choice(self.choice)
        if self.uniform is not None:
            x = rng.uniform(*self.uniform)
        else:
            lo, hi = self.loguniform
            x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        return float(f"{x:.4g}")


class RandomSpec(_Model):
    n: int = Field(ge=1)
    seed: int = 0
    params: dict[str, RandomParam] = Field(min_length=1)


class SlurmSpec(_Model):
    options: dict[str, str | int] = {}

    @field_validator("options")
    @classmethod
    def _no_reserved(cls, v):
        bad = [k for k in v if k.lstrip("-") in ("array", "output", "job-name")]
        if bad:
            raise ValueError(f"{bad[0]} is set by the sweep; remove it")
        return v


class SweepSpec(_Model):
    base: Optional[str] = None
    output_dir: str
    grid: dict[str, list] = {}
    random: Optional[RandomSpec] = None
    overrides: dict[str, Any] = {}
    command: Optional[list[str] | str] = None
    slurm: SlurmSpec = SlurmSpec()

    @model_validator(mode="after")
    def _keys(self):
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key} has no values; give a list of at least one")
        swept = list(self.grid) + (list(self.random.params) if self.random else [])
        if not swept:
            raise ValueError("nothing to sweep; add grid: {key: [values]} or random: {n, params}")
        for key in swept + list(self.overrides):
            if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key):
                raise ValueError(f"{key!r} is not a dotted config key like optimizer.params.lr")
            if key in _RESERVED:
                raise ValueError(f"{key} is set per point by the sweep; remove it")
        dup = set(self.grid) & set(self.random.params if self.random else ())
        dup |= set(swept) & set(self.overrides)
        if dup:
            raise ValueError(f"{sorted(dup)[0]} appears twice (grid / random / overrides); keep one")
        return self


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and validate a sweep file; errors are one line naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    raw = load_yaml(path.read_text(), f"sweep file {path}")   # the configs' loader: 1e-3 is a float
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with output_dir and grid and/or random")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None
    if spec.base is not None and not (path.parent / spec.base).is_file():
        raise ConfigError(f"{path}: base: {path.parent / spec.base} does not exist; give a path relative to the "
                          "sweep file")
    return spec


