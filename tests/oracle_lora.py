"""Independent NumPy (float64) oracles of the methods on LoRA adapters.

Everything is written in terms of the merged update ``dW = s A B`` and the gradient
``G`` of the loss in the merged weight (not in terms of ``g_A``, ``g_B``), so the tests
check the library's reduction to the ``B`` leaf as well as its arithmetic.
"""

import numpy as np

from tests import oracle

EPS = 1e-8


def merged(a, b, s):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return s * np.tensordot(a, b, 1)


def project(a, b, s, r, norm):
  """TPGM's projection of ``dW`` onto the ball of radius ``r``, by scaling ``B``'s columns."""
  b = np.asarray(b, np.float64)
  n = oracle.norms(merged(a, b, s), norm)
  ratio = np.clip(oracle.clipped_radius(r, n) / (n + EPS), 0.0, 1.0)
  return np.asarray(a, np.float64), b * ratio


def grads(a, b, s, g_w):
  """``(g_A, g_B)`` from the gradient ``G`` in the merged weight (chain rule)."""
  a, b, g_w = (np.asarray(x, np.float64) for x in (a, b, g_w))
  a2, g2 = a.reshape(-1, a.shape[-1]), g_w.reshape(-1, g_w.shape[-1])
  return (s * g2 @ b.T).reshape(a.shape), s * a2.T @ g2


class FTP:
  """FTP on one adapter with SGD (learning rate ``lr``): the constraint gamma on ``dW``,
  its amortised gradient ``dL/dgamma = sum_j <G, s A_t B'_{t-1}>_j / n_{t-1, j}``."""

  def __init__(self, s, lr, norm, k=1.0):
    self.s, self.lr, self.norm, self.k = s, lr, norm, k
    self.gamma, self.m, self.v, self.t = EPS, 0.0, 0.0, 0
    self.prev_b, self.prev_n = None, None

  def step(self, a, b, g_w):
    self.t += 1
    g_a, g_b = grads(a, b, self.s, g_w)
    a_c, b_c = a - self.lr * g_a, b - self.lr * g_b
    n = oracle.norms(merged(a_c, b_c, self.s), self.norm) + EPS
    if self.prev_b is None:
      h = 0.0
    else:
      dir_w = merged(a, self.prev_b, self.s)  # dW_t / ratio: the previous candidate direction
      cols = (np.asarray(g_w) * dir_w).reshape(-1, dir_w.shape[-1]).sum(axis=0)
      h = (
        float(np.sum(cols / self.prev_n))
        if self.norm == "mars"
        else float(cols.sum() / self.prev_n)
      )
    if h > 0:
      h *= self.k
    u, self.m, self.v = oracle.adam_step(h, self.m, self.v, self.t)
    self.gamma = min(max(self.gamma + u, EPS), max(float(np.max(n)), EPS))
    self.prev_b, self.prev_n = b_c, n
    return a_c, np.clip(self.gamma / n, 0.0, 1.0) * b_c


def spd(a, b, s, g_w, lr, lam):
  """One SPD step (SGD inner) on ``dW``: returns ``(A', dW')``."""
  g_a, g_b = grads(a, b, s, g_w)
  a_c, b_c = a - lr * g_a, b - lr * g_b
  d_old, d_new = merged(a, b, s), merged(a_c, b_c, s)
  n_old, n_new = np.linalg.norm(d_old), np.linalg.norm(d_new)
  ratio = np.clip((n_new - n_old) / n_new, 0.0, 1.0) if n_new > 0 else 0.0
  selected = n_new > 0 and np.sum(np.asarray(g_w) * d_old) > 0
  return a_c, d_new - (lam * ratio if selected else 0.0) * d_new


def l2sp_grads(a, b, s, alpha):
  """The gradients of ``alpha / 2 ||s A B||_F^2``: ``(alpha s dW B^T, alpha s A^T dW)``."""
  return grads(a, b, s, alpha * merged(a, b, s))
