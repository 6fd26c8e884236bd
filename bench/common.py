"""What the benchmarks share: test pictures (real photographs shipped inside scikit-image) and timing."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import cv2
import numpy as np
from skimage import data


def mosaic() -> np.ndarray:
    """Skimage photographs at (about) native resolution in a 5×4 grid of 520×350 cells: 2600×1400."""
    tiles = [
        data.hubble_deep_field()[:720, :900], data.coffee(), data.rocket(), data.chelsea(), data.astronaut(),
        data.retina()[300:1000, 300:1000], np.dstack([data.gravel()] * 3), data.immunohistochemistry(),
        np.dstack([data.brick()] * 3),
    ]  # fmt: skip
    rows = []
    for r in range(4):
        row = []
        for c in range(5):
            t = tiles[(r * 5 + c) % len(tiles)]
            k = max(520 / t.shape[1], 350 / t.shape[0], 1.0)
            if k > 1:
                t = cv2.resize(t, (round(t.shape[1] * k) + 1, round(t.shape[0] * k) + 1), interpolation=cv2.INTER_CUBIC)
            y, x = (t.shape[0] - 350) // 2, (t.shape[1] - 520) // 2
            row.append(t[y : y + 350, x : x + 520])
        rows.append(np.hstack(row))
    return np.vstack(rows)


def cpu() -> float:
    """CPU seconds (user + system) of this process and its finished children, e.g. ffmpeg."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one call."""
    c0, t0 = cpu(), time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0, cpu() - c0
