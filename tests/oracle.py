"""Independent NumPy (float64) implementations of the TPGM formulas, for tests."""

import numpy as np

EPS = 1e-8


def norms(d, norm):
  d = np.asarray(d, np.float64)
  if norm == "l2":
    return np.sqrt((d * d).sum())
  if d.ndim >= 2:
    return np.abs(d.reshape(-1, d.shape[-1])).sum(axis=0)
  return np.abs(d).sum()


def clipped_radius(r, n):
  hi = max(float(np.max(n, initial=0.0)), EPS)
  return min(max(float(r), EPS), hi)


def project(w, w0, r, norm):
  w, w0 = np.asarray(w, np.float64), np.asarray(w0, np.float64)
  if w.size == 0:
    return w
  n = norms(w - w0, norm)
  ratio = np.clip(clipped_radius(r, n) / (n + EPS), 0.0, 1.0)
  return w0 + ratio * (w - w0)


def init_radius(w, w0, norm):
  w, w0 = np.asarray(w, np.float64), np.asarray(w0, np.float64)
  if w.size == 0:
    return 0.0
  return float(np.min(norms(w - w0, norm))) / 2
