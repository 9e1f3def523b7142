"""Statistics of the timing test (TVLA / dudect style): Welch's t-test with percentile cropping. numpy only.

The timing test times a kernel on inputs of two classes, launched interleaved in random order: fixed vs
random (one fixed input against fresh random ones), or fixed vs a class (zeros, NaN, huge values, ...).
If the kernel's time does not depend on the input, the two timing distributions are the same, and Welch's t

    t = (mean_a - mean_b) / sqrt(var_a / n_a + var_b / n_b)        (sample variances, n - 1)

stays small. TVLA's threshold is |t| > 4.5: for identical distributions and large samples t is about
standard normal, and |t| > 4.5 has probability 7e-6.

Cropping (dudect): GPU timings have a long upper tail (preemption, clock changes, other work) whose variance
can hide a small difference in the body of the distribution. So t is computed on the whole sample and on each
crop: the samples of both classes below a threshold. dudect's thresholds are the percentiles
1 - 0.5 ** (10 (i + 1) / count), i = 0 .. count - 1, of the pooled samples (6.7% to 99.9% for count = 100),
taken from a first batch when streaming. The verdict uses the largest |t| among the whole sample and the crops
in which both classes have at least `min_samples` samples. Crops overlap heavily, so the 101 statistics are far
from independent tests; still, a |t| just over 4.5 in one crop deserves a rerun before it is believed.

Moments are merged batch by batch (Chan, Golub and LeVeque's pairwise update), so streams of millions of
timings of ~1e6 ns with a spread of a few ns lose no precision, and a stream gives the same t as one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

T_THRESHOLD = 4.5


class Moments:
    """Count, mean and sum of squared deviations (m2) of a stream of samples."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, samples) -> None:
        x = np.asarray(samples, dtype=np.float64).ravel()
        if x.size == 0:
            return
        mean = float(x.mean())
        m2 = float(np.square(x - mean).sum())
        n = self.n + x.size
        delta = mean - self.mean
        self.mean += delta * x.size / n
        self.m2 += m2 + delta * delta * self.n * x.size / n
        self.n = n

    @property
    def variance(self) -> float:
        """Sample variance (n - 1); nan below 2 samples."""
        return self.m2 / (self.n - 1) if self.n > 1 else math.nan


def welch_t(a: Moments, b: Moments) -> float:
    """Welch's t of class a against class b: nan below 2 samples in a class; 0 or +-inf without spread."""
    if a.n < 2 or b.n < 2:
        return math.nan
    difference = a.mean - b.mean
    standard_error = math.sqrt(a.variance / a.n + b.variance / b.n)
    if standard_error == 0.0:
        return 0.0 if difference == 0.0 else math.copysign(math.inf, difference)
    return difference / standard_error


def t_statistic(a, b) -> float:
    """Welch's t of two arrays of samples."""
    ma, mb = Moments(), Moments()
    ma.add(a)
    mb.add(b)
    return welch_t(ma, mb)


def dudect_percentiles(count: int = 100) -> np.ndarray:
    """dudect's crop percentiles, as fractions: 1 - 0.5 ** (10 (i + 1) / count) for i = 0 .. count - 1."""
    return 1.0 - 0.5 ** (10.0 * np.arange(1, count + 1) / count)


@dataclass
class TTest:
    t: float  # the statistic of largest |t|: whole sample or a crop with enough samples
    crop: int | None  # None: the whole sample; k: samples below thresholds[k]
    percentile: float | None  # the crop's percentile (fraction), None for the whole sample
    t_whole: float  # t of the whole sample
    t_crops: np.ndarray  # t per crop (nan where a class has fewer than 2 samples)
    n: tuple[int, int]  # samples per class

    @property
    def leak(self) -> bool:
        return abs(self.t) > T_THRESHOLD

    def to_json(self) -> dict:
        return {"t": self.t, "crop": self.crop, "percentile": self.percentile, "t_whole": self.t_whole,
                "n": list(self.n), "leak": self.leak}


class CroppedWelch:
    """Welch's t on the whole sample and on each crop, fed with batches of timings of class 0 or 1.

    `percentiles` are the fractions at which `thresholds` were taken (kept for the report).
    """

    def __init__(self, thresholds, percentiles=None) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.percentiles = None if percentiles is None else np.asarray(percentiles, dtype=np.float64)
        self.moments = [[Moments() for _ in range(len(self.thresholds) + 1)] for _ in range(2)]

    def add(self, cls: int, samples) -> None:
        x = np.asarray(samples, dtype=np.float64).ravel()
        whole, *crops = self.moments[cls]
        whole.add(x)
        for moments, threshold in zip(crops, self.thresholds):
            moments.add(x[x < threshold])

    def t_values(self) -> np.ndarray:
        """t of the whole sample (index 0), then of each crop."""
        return np.array([welch_t(a, b) for a, b in zip(*self.moments)])

    def result(self, min_samples: int = 100) -> TTest:
        t = self.t_values()
        counts = np.array([[m.n for m in cls] for cls in self.moments]).min(axis=0)
        eligible = [0] + [k for k in range(1, len(t)) if counts[k] >= min_samples and not math.isnan(t[k])]
        best = max(eligible, key=lambda k: -1.0 if math.isnan(t[k]) else abs(t[k]))
        crop = None if best == 0 else best - 1
        percentile = None if crop is None or self.percentiles is None else float(self.percentiles[crop])
        return TTest(float(t[best]), crop, percentile, float(t[0]), t[1:],
                     (self.moments[0][0].n, self.moments[1][0].n))


def compare(a, b, *, crops: int = 100, min_samples: int = 100) -> TTest:
    """Welch's t of timings a against b, whole and cropped at dudect's percentiles of the pooled samples."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    percentiles = dudect_percentiles(crops)
    test = CroppedWelch(np.quantile(np.concatenate([a, b]), percentiles), percentiles)
    test.add(0, a)
    test.add(1, b)
    return test.result(min_samples)


def fixed_vs_random(fixed, random, **options) -> TTest:
    """TVLA's non-specific test: timings of one fixed input against timings of fresh random inputs."""
    return compare(fixed, random, **options)


def fixed_vs_classes(fixed, classes: dict, **options) -> dict[str, TTest]:
    """The fixed input's timings against each class's ({"zeros": timings, "nan": timings, ...})."""
    return {name: compare(fixed, timings, **options) for name, timings in classes.items()}
