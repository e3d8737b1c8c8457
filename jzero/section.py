"""The base class of every config section (``jzero.config``, ``jzero.precision``, ``jzero.monitor``).

Unknown keys are refused (``extra="forbid"``: a misspelt DeepSpeed key is an error, never ignored) and assignments
are validated, so a section changed after loading still passes its own checks.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
