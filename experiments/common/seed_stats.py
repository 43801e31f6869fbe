"""Means over seeds with their 95% t-interval, and the verdict a row may carry: the findings' one rule."""
import math

import numpy as np

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(xs) -> tuple:
  """(mean, half-width of the 95% t-interval over xs); the half-width is nan for fewer than 2 values."""
  xs = np.asarray(xs, float)
  if len(xs) < 2:
    return float(xs.mean()), float("nan")
  return float(xs.mean()), float(T975.get(len(xs) - 1, 1.96) * xs.std(ddof=1) / math.sqrt(len(xs)))


def separable(mean: float, half: float) -> bool:
  """Whether the interval excludes zero (never with one seed)."""
  return not math.isnan(half) and abs(mean) > half


def mean_pm(mean: float, half: float, digits: int = 4, sign: bool = False) -> str:
  """'1.2345 ± 0.0123' ('1.2345' without an interval); sign: '+0.0123 ± ...'."""
  m = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
  return m if math.isnan(half) else f"{m} ± {half:.{digits}f}"
