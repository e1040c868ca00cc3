"""The first step of every family's ``make_config``: a variant's sizes, overridden by explicit
fields, into the config dataclass, refusing unknown fields and missing sizes by name."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def sized_config(cls: type, label: str, sizes: Mapping[str, Any], overrides: Mapping[str, Any],
                 required: tuple[str, ...], example: str):
  """``cls(**sizes)`` with the non-None ``overrides`` winning; ``label`` names the family in
  messages, ``example`` is a variant to suggest."""
  valid = [f.name for f in dataclasses.fields(cls)]
  unknown = set(overrides) - set(valid)
  if unknown:
    raise ValueError(f"unknown {label} field(s) {sorted(unknown)}; valid: {valid}.")
  sizes = dict(sizes, **{k: v for k, v in overrides.items() if v is not None})
  missing = [f for f in required if f not in sizes]
  if missing:
    raise ValueError(f"{label} sizes {missing} are not set: give a variant (e.g. {example!r}) or set them "
                     "explicitly.")
  return cls(**sizes)
