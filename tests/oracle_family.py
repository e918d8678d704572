"""Independent NumPy (float64) implementations of FTP, SPD, L2-SP and WiSE-FT.

Written from the papers and the reference semantics in DESIGN.md (section 3),
one tensor at a time, with the reference's explicit first-step branch. The
inner optimizers are written from their formulas (PyTorch conventions), not
by calling optax. Every ``update`` returns ``u`` with ``w + u`` the plain
next value.
"""

import numpy as np

EPS = 1e-8


class SGD:
  """SGD with coupled weight decay and (Nesterov) momentum, as torch.optim.SGD."""

  def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    self.lr, self.mom, self.nesterov, self.wd = lr, momentum, nesterov, weight_decay
    self.buf = {}

  def update(self, i, w, g):
    d = g + self.wd * w
    if self.mom:
      self.buf[i] = d.copy() if i not in self.buf else self.mom * self.buf[i] + d
      d = d + self.mom * self.buf[i] if self.nesterov else self.buf[i]
    return -self.lr * d


class AdamW:
  """Adam with decoupled weight decay (``weight_decay=0``: Adam)."""

  def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
    self.m, self.v, self.t = {}, {}, {}

  def update(self, i, w, g):
    self.t[i] = self.t.get(i, 0) + 1
    self.m[i] = self.b1 * self.m.get(i, 0.0) + (1 - self.b1) * g
    self.v[i] = self.b2 * self.v.get(i, 0.0) + (1 - self.b2) * g * g
    m_hat = self.m[i] / (1 - self.b1 ** self.t[i])
    v_hat = self.v[i] / (1 - self.b2 ** self.t[i])
    return -self.lr * (m_hat / (np.sqrt(v_hat) + self.eps) + self.wd * w)


def _reduce_axes(x, norm):
  """Axes one norm reduces: all but the last for mars at rank >= 2."""
  return tuple(range(x.ndim - 1)) if norm == "mars" and x.ndim >= 2 else tuple(range(x.ndim))


def ftp_norms(c, norm):
  if norm == "l2":
    return np.sqrt(np.sum(c * c)) + EPS
  return np.sum(np.abs(c), axis=_reduce_axes(c, norm)) + EPS


class FTP:
  """The FTP step for a list of tensors (anchor None: unconstrained)."""

  def __init__(self, inner, anchors, k=1.0, norm="mars"):
    self.inner, self.anchors, self.k, self.norm = inner, anchors, k, norm
    self.t = 1
    self.gamma, self.m, self.v, self.c_prev, self.n_prev = {}, {}, {}, {}, {}

  def step(self, ws, gs):
    out = []
    for i, (w, w0, g) in enumerate(zip(ws, self.anchors, gs)):
      u = self.inner.update(i, w, g)
      if w0 is None:
        out.append(w + u)
        continue
      c = w + u - w0
      n = ftp_norms(c, self.norm)
      if self.t == 1:
        gamma, self.m[i], self.v[i] = EPS, 0.0, 0.0
      else:
        h = float(
          np.sum(np.sum(g * self.c_prev[i], axis=_reduce_axes(g, self.norm)) / self.n_prev[i])
        )
        if h > 0:
          h *= self.k
        self.m[i] = 0.9 * self.m[i] + 0.1 * h
        self.v[i] = 0.999 * self.v[i] + 0.001 * h * h
        m_hat = self.m[i] / (1 - 0.9**self.t)
        v_hat = self.v[i] / (1 - 0.999**self.t)
        gamma = self.gamma[i] - 1e-2 * m_hat / (np.sqrt(v_hat) + EPS)
        gamma = min(max(gamma, EPS), float(np.max(n)))
      self.gamma[i], self.c_prev[i], self.n_prev[i] = gamma, c, n
      out.append(w0 + np.clip(gamma / n, 0.0, 1.0) * c)
    self.t += 1
    return out


def spd(w, w0, g, u, weight_decay):
  """One SPD step for one tensor; ``w0`` may be 0 (no anchor)."""
  c = w + u
  if np.sum(g * (w - w0)) > 0:
    n_new, n_old = np.linalg.norm(c - w0), np.linalg.norm(w - w0)
    ratio = 0.0 if n_new == 0 else float(np.clip((n_new - n_old) / n_new, 0.0, 1.0))
    c = c - weight_decay * ratio * (c - w0)
  return c


def l2sp_grad(g, w, w0, alpha, beta):
  return g + (alpha * (w - w0) if w0 is not None else beta * w)


def interpolate(w0, w, alpha):
  return w if w0 is None else (1 - alpha) * w0 + alpha * w


class DiGraP:
  """DiGraP's gradient modification for a list of tensors (anchor None: not projected).

  Written from DESIGN.md section 3 with explicit branches: omega_1 = 0 and no
  hyper-gradient at the first step; afterwards the cosine between the
  gradient and the previous projection drives an Adam step on omega whose
  bias corrections use the global step t.
  """

  def __init__(self, anchors, lr, kappa=1.0):
    self.anchors, self.lr, self.kappa = anchors, lr, kappa
    self.t = 1
    self.omega, self.m, self.v, self.p_prev = {}, {}, {}, {}

  def grads(self, ws, gs):
    out = []
    for i, (w, w0, g) in enumerate(zip(ws, self.anchors, gs)):
      if w0 is None:
        out.append(g)
        continue
      r = w - w0
      dot = float(np.sum(g * r))
      p = dot / (float(np.sum(r * r)) + EPS) * r
      if self.t == 1:
        omega, self.m[i], self.v[i] = 0.0, 0.0, 0.0
      else:
        q = self.p_prev[i]
        h = float(np.sum(g * q)) / (np.linalg.norm(g) * np.linalg.norm(q) + EPS)
        self.m[i] = 0.9 * self.m[i] + 0.1 * h
        self.v[i] = 0.999 * self.v[i] + 0.001 * h * h
        m_hat = self.m[i] / (1 - 0.9**self.t)
        v_hat = self.v[i] / (1 - 0.999**self.t)
        omega = self.omega[i] - self.lr * m_hat / (np.sqrt(v_hat) + EPS)
        omega = min(max(omega, 0.0), self.kappa)
      self.omega[i], self.p_prev[i] = omega, p
      out.append(g - omega * p if dot < 0 else g)
    self.t += 1
    return out
