"""Size limits checked before memory is allocated: each has a name, a default and an environment variable that
raises (or lowers) it, and the error that refuses a value names all three.

| limit | default | variable |
| --- | --- | --- |
| pixels of a plain image (decoded whole) | 2**31 | ``STALIGN_MAX_IMAGE_PIXELS`` |
| crop side in output pixels (``patch_px``) | 4096 | ``STALIGN_MAX_PATCH_PX`` |
| crop width in µm (``spot_um``, ``niche_um``) | 10000 | ``STALIGN_MAX_CROP_UM`` |
| crop width read from the slide, level-0 px | 32768 | ``STALIGN_MAX_CROP_READ_PX`` |
| tiles of a prediction grid | 5000000 | ``STALIGN_MAX_TILES`` |
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from stofm.util.errors import InputError


@dataclass(frozen=True)
class Limit:
    default: float
    variable: str
    about: str


LIMITS: dict[str, Limit] = {
    "image_pixels": Limit(2 ** 31, "STALIGN_MAX_IMAGE_PIXELS", "pixels of a plain image, decoded whole into memory"),
    "patch_px": Limit(4096, "STALIGN_MAX_PATCH_PX", "crop side in pixels"),
    "crop_um": Limit(10_000, "STALIGN_MAX_CROP_UM", "crop width in µm"),
    "crop_read_px": Limit(32_768, "STALIGN_MAX_CROP_READ_PX", "crop width read from the slide in level-0 px"),
    "tiles": Limit(5_000_000, "STALIGN_MAX_TILES", "tiles of a prediction grid"),
}


class LimitError(InputError):
    """A size above one of :data:`LIMITS` (the message names the limit and the variable that raises it)."""


def limit(name: str, *, default: float | None = None) -> float:
    """The current bound ``name``: its environment variable when set (a positive number), else ``default`` (None:
    the table's)."""
    spec = LIMITS[name]
    raw = os.environ.get(spec.variable, "").strip()
    if not raw:
        return spec.default if default is None else default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{spec.variable}={raw!r} must be a positive number ({spec.about})")
    return value


def check_limit(name: str, value: float, what: str) -> None:
    """:class:`LimitError` when ``value`` is above the bound ``name``; ``what`` names the value (e.g. a file)."""
    bound = limit(name)
    if not value <= bound:
        spec = LIMITS[name]
        raise LimitError(f"{what} is {value:,.6g}, above the limit of {bound:,.6g} {spec.about}; "
                         f"set {spec.variable} higher to allow it")
