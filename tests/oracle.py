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


def adam_step(g, m, v, t, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
  """One Adam step of a scalar: ``(update, m, v)`` (``t`` counts from 1)."""
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  mh, vh = m / (1 - b1**t), v / (1 - b2**t)
  return -lr * mh / (np.sqrt(vh) + eps), m, v


class TrainableProjection:
  """TPGM during fine-tuning for a list of tensors (anchor None: unconstrained).

  Per step: the inner update ``u`` gives the candidate ``c = w + u``; at the
  first step the radii are ``min(norms(c - w0)) / 2``; when held-out batches
  are given, each is one radius iteration (clip the radii, central finite
  differences of ``loss(project(c, w0, r), batch)`` in every radius, one Adam
  step with the iteration counter shared by all radii); then ``w = project(c,
  w0, r)``. ``lazy``: a constrained tensor's candidate is ``f + u`` with ``f``
  its previous candidate (the pre-trained value at first), ``u`` computed at
  the projected ``w``.
  """

  def __init__(self, inner, anchors, loss, norm, lr=1e-2, units="absolute", lazy=False):
    self.inner, self.anchors, self.loss, self.norm, self.lr = inner, anchors, loss, norm, lr
    self.free = [None if a is None else a.copy() for a in anchors] if lazy else None
    self.radii, self.m, self.v, self.t, self.iters = {}, {}, {}, 0, 0
    # "anchor" units: Adam steps r / u with u the anchor's own largest norm (1 if zero).
    self.unit = {
      i: (float(np.max(norms(a, norm))) or 1.0) if units == "anchor" else 1.0
      for i, a in enumerate(anchors)
      if a is not None
    }

  def _projected(self, cands, radii):
    return [
      c if a is None else project(c, a, radii[i], self.norm)
      for i, (c, a) in enumerate(zip(cands, self.anchors))
    ]

  def step(self, ws, gs, batches=None):
    starts = ws if self.free is None else [w if f is None else f for w, f in zip(ws, self.free)]
    cands = [s + self.inner.update(i, w, g) for i, (s, w, g) in enumerate(zip(starts, ws, gs))]
    if self.free is not None:
      self.free = [None if f is None else c for f, c in zip(self.free, cands)]
    constrained = [i for i, a in enumerate(self.anchors) if a is not None]
    if self.t == 0:
      self.radii = {i: init_radius(cands[i], self.anchors[i], self.norm) for i in constrained}
      self.m = {i: 0.0 for i in constrained}
      self.v = {i: 0.0 for i in constrained}
    for batch in batches if batches is not None else ():
      self.iters += 1
      n = {i: norms(cands[i] - self.anchors[i], self.norm) for i in constrained}
      radii = {i: clipped_radius(self.radii[i], n[i]) for i in constrained}
      for i in constrained:
        h = 1e-5 * max(radii[i], 1e-3)
        up, down = dict(radii), dict(radii)
        up[i], down[i] = radii[i] + h, radii[i] - h
        g = (
          self.loss(self._projected(cands, up), batch)
          - self.loss(self._projected(cands, down), batch)
        ) / (2 * h)
        # d loss / d(r / unit) = unit * d loss / d r; the step is taken in those units.
        u, self.m[i], self.v[i] = adam_step(
          g * self.unit[i], self.m[i], self.v[i], self.iters, self.lr
        )
        self.radii[i] = radii[i] + u * self.unit[i]
    self.t += 1
    return self._projected(cands, self.radii)
