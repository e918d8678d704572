"""Vectorised NumPy renderer of the procedural multi-domain shapes benchmark.

Thirty shape classes are drawn as implicit-function masks (random rotation,
scale and offset) at twice the output resolution and box-averaged 2x2, so
edges are anti-aliased: the ten :data:`TARGET_CLASSES` of the fine-tuning task
and twenty :data:`PRETRAIN_CLASSES` that only the pre-training of the
``transfer`` benchmark sees.  Four visual domains mimic DomainNet:

* ``real``: dark textured background (sine grating, smooth colour noise,
  colour blobs), bright object with directional shading and faint texture.
* ``sketch``: thin grey outline of a slightly warped shape on noisy light
  paper, greyscale.
* ``painting``: strongly warped shape, bright fill with blurred colour
  strokes, mid-dark noisy background, box blur.
* ``clipart``: flat saturated fill, thick black outline, white or pale flat
  background.

Everything is a pure function of the ``rng`` handed in: the same generator
state always gives the same bytes.  Images are rendered in fixed-size chunks,
many per NumPy call (the chunk size is a constant, so it never changes the
result).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

CLASS_NAMES = (
  # The fine-tuning task's classes.
  "circle",
  "square",
  "triangle",
  "pentagon",
  "star",
  "cross",
  "ring",
  "arrow",
  "heart",
  "crescent",
  # Pre-training classes of the transfer benchmark.
  "hexagon",
  "star4",
  "star6",
  "ellipse",
  "bar",
  "diamond",
  "tee",
  "ell",
  "u_shape",
  "h_shape",
  "semicircle",
  "droplet",
  "flower",
  "gear",
  "hourglass",
  "chevron",
  "square_frame",
  "triangle_frame",
  "target",
  "cloud",
)
NUM_CLASSES = len(CLASS_NAMES)
TARGET_CLASSES = tuple(range(10))
PRETRAIN_CLASSES = tuple(range(10, NUM_CLASSES))
DOMAINS = ("real", "sketch", "painting", "clipart")
IMAGE_SIZE = 32

_SUPER = 2  # supersampling factor: masks are drawn at 64x64
_HI = IMAGE_SIZE * _SUPER
_CHUNK = 256  # images per vectorised call; fixed, part of the definition


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [-1, 1], x to the right, y up."""
  c = (np.arange(size, dtype=np.float32) + 0.5) / (size / 2) - 1.0
  return c[None, :], -c[:, None]


_XH, _YH = _grid(_HI)  # (1, 64), (64, 1)
_XL, _YL = _grid(IMAGE_SIZE)  # (1, 32), (32, 1)


# --------------------------------------------------------------------------
# Shapes: implicit functions of local coordinates (u, v), shape (m, H, W).
# The shapes fit roughly in the unit disc.


def _regular_polygon(u, v, sides: int, apothem: float):
  inside = np.ones(u.shape, dtype=bool)
  for k in range(sides):
    a = np.pi / 2 + np.pi / sides + 2 * np.pi * k / sides
    inside &= u * np.float32(np.cos(a)) + v * np.float32(np.sin(a)) <= apothem
  return inside


def _circle(u, v):
  return u * u + v * v <= 0.9**2


def _square(u, v):
  return np.maximum(np.abs(u), np.abs(v)) <= 0.72


def _triangle(u, v):
  return _regular_polygon(u, v, 3, 0.5)


def _pentagon(u, v):
  return _regular_polygon(u, v, 5, 0.8)


def _star(u, v):
  r = np.sqrt(u * u + v * v)
  phi = np.arctan2(v, u) - np.float32(np.pi / 2)
  t = np.abs(((phi * np.float32(5 / (2 * np.pi))) % 1.0) - 0.5) * 2  # 1 at tips
  return r <= 0.38 + 0.62 * t * t


def _cross(u, v):
  au, av = np.abs(u), np.abs(v)
  return ((au <= 0.28) & (av <= 0.9)) | ((av <= 0.28) & (au <= 0.9))


def _ring(u, v):
  r2 = u * u + v * v
  return (r2 <= 0.95**2) & (r2 >= 0.55**2)


def _arrow(u, v):
  shaft = (np.abs(v) <= 0.24) & (u >= -0.95) & (u <= 0.15)
  head = (u >= 0.0) & (np.abs(v) <= (0.95 - u) * 1.05)
  return shaft | head


def _heart(u, v):
  x = u * 1.15
  y = v * 1.15 + 0.12
  q = x * x + y * y - 1.0
  return q * q * q - x * x * y * y * y <= 0


def _crescent(u, v):
  return (u * u + v * v <= 0.92**2) & ((u - 0.42) ** 2 + (v - 0.1) ** 2 >= 0.72**2)


def _star_of(points: int, inner: float):
  """A ``points``-point star whose radius goes from ``inner`` (notches) to 0.92 (tips)."""

  def star(u, v):
    r = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u) - np.float32(np.pi / 2)
    t = np.abs(((phi * np.float32(points / (2 * np.pi))) % 1.0) - 0.5) * 2
    return r <= inner + (0.92 - inner) * t * t

  return star


def _hexagon(u, v):
  return _regular_polygon(u, v, 6, 0.8)


def _ellipse(u, v):
  return (u / 0.92) ** 2 + (v / 0.45) ** 2 <= 1


def _bar(u, v):
  return (np.abs(u) <= 0.92) & (np.abs(v) <= 0.38)


def _diamond(u, v):
  return np.abs(u) / 0.92 + np.abs(v) / 0.52 <= 1


def _tee(u, v):
  top = (v >= 0.45) & (v <= 0.9) & (np.abs(u) <= 0.9)
  return top | ((np.abs(u) <= 0.22) & (np.abs(v) <= 0.9))


def _ell(u, v):
  upright = (u >= -0.7) & (u <= -0.25) & (np.abs(v) <= 0.9)
  return upright | ((v >= -0.9) & (v <= -0.45) & (np.abs(u) <= 0.7))


def _u_shape(u, v):
  outer = (np.abs(u) <= 0.8) & (np.abs(v) <= 0.85)
  return outer & ~((np.abs(u) <= 0.38) & (v >= -0.4))


def _h_shape(u, v):
  posts = (np.abs(u) >= 0.45) & (np.abs(u) <= 0.85) & (np.abs(v) <= 0.9)
  return posts | ((np.abs(u) <= 0.85) & (np.abs(v) <= 0.2))


def _semicircle(u, v):
  return (u * u + (v + 0.35) ** 2 <= 0.95**2) & (v >= -0.35)


def _droplet(u, v):
  bulb = u * u + (v + 0.3) ** 2 <= 0.6**2
  return bulb | ((v >= -0.3) & (np.abs(u) <= (0.95 - v) * 0.48))


def _flower(u, v):
  return np.sqrt(u * u + v * v) <= 0.45 + 0.5 * np.abs(np.cos(2 * np.arctan2(v, u)))


def _gear(u, v):
  r = np.sqrt(u * u + v * v)
  teeth = np.cos(8 * np.arctan2(v, u)) > 0
  return (r <= 0.68 + 0.25 * teeth) & (r >= 0.25)


def _hourglass(u, v):
  return (np.abs(u) <= np.abs(v) * 0.85 + 0.12) & (np.abs(v) <= 0.9)


def _chevron(u, v):
  return (v <= 0.9 - 1.2 * np.abs(u)) & (v >= 0.25 - 1.2 * np.abs(u)) & (np.abs(u) <= 0.85)


def _square_frame(u, v):
  m = np.maximum(np.abs(u), np.abs(v))
  return (m <= 0.85) & (m >= 0.5)


def _triangle_frame(u, v):
  return _regular_polygon(u, v, 3, 0.5) & ~_regular_polygon(u, v, 3, 0.2)


def _target(u, v):
  r2 = u * u + v * v
  return ((r2 <= 0.95**2) & (r2 >= 0.7**2)) | (r2 <= 0.35**2)


def _cloud(u, v):
  puffs = ((u + 0.45) ** 2 + (v + 0.1) ** 2 <= 0.45**2) | (
    (u - 0.45) ** 2 + (v + 0.1) ** 2 <= 0.45**2
  )
  top = u * u + (v - 0.2) ** 2 <= 0.55**2
  return puffs | top | ((np.abs(u) <= 0.45) & (v >= -0.55) & (v <= -0.1))


SHAPE_FNS: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
  _circle,
  _square,
  _triangle,
  _pentagon,
  _star,
  _cross,
  _ring,
  _arrow,
  _heart,
  _crescent,
  _hexagon,
  _star_of(4, 0.3),
  _star_of(6, 0.45),
  _ellipse,
  _bar,
  _diamond,
  _tee,
  _ell,
  _u_shape,
  _h_shape,
  _semicircle,
  _droplet,
  _flower,
  _gear,
  _hourglass,
  _chevron,
  _square_frame,
  _triangle_frame,
  _target,
  _cloud,
)
assert len(SHAPE_FNS) == NUM_CLASSES


# --------------------------------------------------------------------------
# Small vectorised helpers.


def _col(a: np.ndarray) -> np.ndarray:
  """Per-image scalar -> broadcastable over (m, H, W[, C])."""
  return a.astype(np.float32).reshape((-1,) + (1,) * 2)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorised HSV (each (m,)) -> RGB (m, 3) in [0, 1]."""
  k = (np.array([5.0, 3.0, 1.0], dtype=np.float32)[None, :] + h[:, None] * 6) % 6
  f = np.clip(np.minimum(k, 4 - k), 0, 1)
  return (v[:, None] * (1 - s[:, None] * f)).astype(np.float32)


def _interp_matrix(k: int, size: int = IMAGE_SIZE) -> np.ndarray:
  """(size, k) bilinear up-sampling weights from a k-grid to a size-grid."""
  pos = (np.arange(size) + 0.5) * k / size - 0.5
  pos = np.clip(pos, 0, k - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, k - 1)
  w = (pos - lo).astype(np.float32)
  m = np.zeros((size, k), np.float32)
  m[np.arange(size), lo] += 1 - w
  m[np.arange(size), hi] += w
  return m


def _smooth_noise(rng: np.random.Generator, m: int, k: int, channels: int, scale):
  """Smooth noise: a k x k Gaussian grid up-sampled bilinearly to 32 x 32."""
  grid = rng.standard_normal((m, k, k, channels), dtype=np.float32)
  w = _interp_matrix(k)
  out = np.einsum("yi,mijc,xj->myxc", w, grid, w, optimize=True)
  return out * np.asarray(scale, np.float32).reshape((-1, 1, 1, 1))


def _downsample(mask: np.ndarray) -> np.ndarray:
  """(m, 64, 64) bool -> (m, 32, 32) float32 coverage."""
  m = mask.shape[0]
  return mask.reshape(m, IMAGE_SIZE, _SUPER, IMAGE_SIZE, _SUPER).mean(axis=(2, 4), dtype=np.float32)


def _dilate(mask: np.ndarray) -> np.ndarray:
  p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
  return p[:, 1:-1, 1:-1] | p[:, :-2, 1:-1] | p[:, 2:, 1:-1] | p[:, 1:-1, :-2] | p[:, 1:-1, 2:]


def _erode(mask: np.ndarray) -> np.ndarray:
  return ~_dilate(~mask)


def _box_blur(img: np.ndarray) -> np.ndarray:
  """3x3 box blur of (m, H, W, C) with edge padding."""
  p = np.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = img.shape[1:3]
  rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
  return (rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:])[:, :h, :w] / 9.0


# --------------------------------------------------------------------------
# Geometry.


def _shape_masks(rng: np.random.Generator, labels: np.ndarray, warp) -> np.ndarray:
  """Hi-res (m, 64, 64) boolean masks of randomly placed shapes.

  ``warp`` = (low, high) amplitude of a sinusoidal coordinate warp.
  """
  m = labels.shape[0]
  theta = rng.uniform(0, 2 * np.pi, m)
  scale = rng.uniform(0.45, 0.8, m)
  off = rng.uniform(-0.3, 0.3, (m, 2))
  amp = rng.uniform(warp[0], warp[1], (m, 2))
  freq = rng.uniform(2.0, 4.0, (m, 2))
  phase = rng.uniform(0, 2 * np.pi, (m, 2))

  dx = _XH - _col(off[:, 0])
  dy = _YH - _col(off[:, 1])
  c, s, sc = _col(np.cos(theta)), _col(np.sin(theta)), _col(scale)
  u = (c * dx + s * dy) / sc
  v = (c * dy - s * dx) / sc
  if warp[1] > 0:
    u, v = (
      u + _col(amp[:, 0]) * np.sin(_col(freq[:, 0]) * v + _col(phase[:, 0])),
      v + _col(amp[:, 1]) * np.sin(_col(freq[:, 1]) * u + _col(phase[:, 1])),
    )
  mask = np.zeros((m, _HI, _HI), dtype=bool)
  for cls in np.unique(labels):
    idx = np.nonzero(labels == cls)[0]
    mask[idx] = SHAPE_FNS[cls](u[idx], v[idx])
  return mask


# --------------------------------------------------------------------------
# Domains: each returns float images (m, 32, 32, 3), roughly in [0, 1].


def _real(rng, labels):
  m = labels.shape[0]
  alpha = _downsample(_shape_masks(rng, labels, (0.0, 0.0)))[..., None]
  base = rng.uniform(0.05, 0.35, (m, 3)).astype(np.float32)
  g_ang = rng.uniform(0, 2 * np.pi, m)
  g_freq = rng.uniform(4, 12, m)
  g_phase = rng.uniform(0, 2 * np.pi, m)
  proj = _XL * _col(np.cos(g_ang)) + _YL * _col(np.sin(g_ang))
  grating = 0.06 * np.sin(_col(g_freq) * proj + _col(g_phase))
  bg = base[:, None, None, :] + grating[..., None]
  bg = bg + _smooth_noise(rng, m, 4, 3, 0.08)
  for _ in range(2):
    ctr = rng.uniform(-1, 1, (m, 2))
    sig = rng.uniform(0.2, 0.45, m)
    colour = rng.uniform(-0.15, 0.3, (m, 3)).astype(np.float32)
    d2 = (_XL - _col(ctr[:, 0])) ** 2 + (_YL - _col(ctr[:, 1])) ** 2
    bg = bg + np.exp(-d2 / _col(2 * sig**2))[..., None] * colour[:, None, None, :]

  obj = _hsv_to_rgb(
    rng.uniform(0, 1, m).astype(np.float32),
    rng.uniform(0.3, 0.85, m).astype(np.float32),
    rng.uniform(0.75, 1.0, m).astype(np.float32),
  )
  l_ang = rng.uniform(0, 2 * np.pi, m)
  shade = 0.78 + 0.22 * (_XL * _col(np.cos(l_ang)) + _YL * _col(np.sin(l_ang)))
  t_ang = rng.uniform(0, 2 * np.pi, m)
  t_freq = rng.uniform(10, 20, m)
  tex = 1 + 0.05 * np.sin(_col(t_freq) * (_XL * _col(np.cos(t_ang)) + _YL * _col(np.sin(t_ang))))
  fg = obj[:, None, None, :] * (shade * tex)[..., None]
  img = bg * (1 - alpha) + fg * alpha
  return img + rng.normal(0, 0.03, img.shape).astype(np.float32)


def _sketch(rng, labels):
  m = labels.shape[0]
  mask = _shape_masks(rng, labels, (0.02, 0.07))
  line = _downsample(_dilate(mask) & ~_erode(mask))
  paper = _col(rng.uniform(0.82, 0.95, m)) + rng.normal(
    0, 0.04, (m, IMAGE_SIZE, IMAGE_SIZE)
  ).astype(np.float32)
  paper = paper + _smooth_noise(rng, m, 6, 1, 0.03)[..., 0]
  ink = _col(rng.uniform(0.1, 0.45, m))
  strength = _col(rng.uniform(0.75, 1.0, m))
  a = np.clip(line * 1.3, 0, 1) * strength
  grey = paper * (1 - a) + ink * a
  return np.repeat(grey[..., None], 3, axis=-1)


def _painting(rng, labels):
  m = labels.shape[0]
  alpha = _downsample(_shape_masks(rng, labels, (0.05, 0.12)))[..., None]
  bg_col = rng.uniform(0.15, 0.45, (m, 3)).astype(np.float32)
  bg = bg_col[:, None, None, :] + _smooth_noise(rng, m, 8, 3, 0.1)
  bg = bg + rng.normal(0, 0.05, bg.shape).astype(np.float32)
  fill = _hsv_to_rgb(
    rng.uniform(0, 1, m).astype(np.float32),
    rng.uniform(0.5, 0.9, m).astype(np.float32),
    rng.uniform(0.75, 1.0, m).astype(np.float32),
  )
  s_ang = rng.uniform(0, 2 * np.pi, m)
  s_freq = rng.uniform(6, 14, m)
  warp = _smooth_noise(rng, m, 5, 1, 1.5)[..., 0]
  strokes = np.sin(_col(s_freq) * (_XL * _col(np.cos(s_ang)) + _YL * _col(np.sin(s_ang))) + warp)
  stroke_col = rng.uniform(-0.25, 0.25, (m, 3)).astype(np.float32)
  fg = fill[:, None, None, :] + strokes[..., None] * stroke_col[:, None, None, :]
  fg = fg + _smooth_noise(rng, m, 8, 3, 0.08)
  img = _box_blur(bg * (1 - alpha) + fg * alpha)
  return img + rng.normal(0, 0.03, img.shape).astype(np.float32)


def _clipart(rng, labels):
  m = labels.shape[0]
  mask = _shape_masks(rng, labels, (0.0, 0.0))
  inner = mask
  for _ in range(3):
    inner = _erode(inner)
  a_fill = _downsample(inner)[..., None]
  a_line = _downsample(mask & ~inner)[..., None]
  white = rng.uniform(0, 1, m) < 0.5
  bg = _hsv_to_rgb(
    rng.uniform(0, 1, m).astype(np.float32),
    np.where(white, 0.0, rng.uniform(0.08, 0.25, m)).astype(np.float32),
    np.where(white, 1.0, rng.uniform(0.93, 1.0, m)).astype(np.float32),
  )
  fill = _hsv_to_rgb(
    rng.uniform(0, 1, m).astype(np.float32),
    rng.uniform(0.85, 1.0, m).astype(np.float32),
    rng.uniform(0.85, 1.0, m).astype(np.float32),
  )
  ink = _col(rng.uniform(0.0, 0.12, m))[..., None]
  return (
    bg[:, None, None, :] * (1 - a_fill - a_line) + fill[:, None, None, :] * a_fill + ink * a_line
  )


_DOMAIN_FNS = {"real": _real, "sketch": _sketch, "painting": _painting, "clipart": _clipart}


def render_images(rng: np.random.Generator, labels: np.ndarray, domain: str) -> np.ndarray:
  """Renders ``labels`` (int array, (n,)) in ``domain``: uint8 (n, 32, 32, 3).

  Draws everything from ``rng``; the result depends only on its state.
  """
  if domain not in _DOMAIN_FNS:
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
  labels = np.asarray(labels, dtype=np.int64)
  if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES)):
    raise ValueError(f"labels must be a 1-D int array in [0, {NUM_CLASSES})")
  out = np.empty((labels.shape[0], IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for start in range(0, labels.shape[0], _CHUNK):
    part = labels[start : start + _CHUNK]
    img = _DOMAIN_FNS[domain](rng, part)
    out[start : start + part.shape[0]] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
  return out


def balanced_labels(rng: np.random.Generator, n: int, classes=TARGET_CLASSES) -> np.ndarray:
  """``n`` labels from ``classes``, as balanced as possible, shuffled by ``rng``."""
  classes = np.asarray(classes, dtype=np.int64)
  return classes[rng.permutation(np.arange(n) % len(classes))]


def render_split(
  seed: int, split_id: int, domain: str, n: int, classes=TARGET_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
  """Images and labels of one (split, domain) cell: a pure function of its arguments.

  Uses ``np.random.default_rng([seed, split_id, domain_id])``; labels are drawn
  from ``classes`` (indices into :data:`CLASS_NAMES`).
  """
  rng = np.random.default_rng([seed, split_id, DOMAINS.index(domain)])
  labels = balanced_labels(rng, n, classes)
  return render_images(rng, labels, domain), labels
