"""The augmentation (experiments/data/augment.py) against independent NumPy computations.

The resampling oracle is a float64 NumPy implementation of separable
resampling with PIL's conventions (pixel centres at ``i + 0.5``, the filter
stretched by the scale when shrinking, i.e. antialiased): triangle (bilinear)
and Keys cubic (a = -0.5) kernels. PIL works in fixed point with an 8-bit
intermediate image, hence a tolerance of one grey level.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from experiments.data import augment


def _kernel(name):
  if name == "bilinear":
    return (lambda x: np.maximum(0.0, 1.0 - np.abs(x))), 1.0

  def cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(
      x < 1,
      ((a + 2) * x - (a + 3)) * x * x + 1,
      np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0),
    )

  return cubic, 2.0


def _weights(n_in, n_out, kernel):
  """(n_out, n_in) resampling matrix."""
  f, support = _kernel(kernel)
  scale = n_in / n_out
  stretch = max(scale, 1.0)
  out = np.zeros((n_out, n_in))
  for i in range(n_out):
    centre = (i + 0.5) * scale
    lo = max(int(centre - support * stretch + 0.5), 0)
    hi = min(int(centre + support * stretch + 0.5), n_in)
    j = np.arange(lo, hi)
    w = f((j - centre + 0.5) / stretch)
    out[i, lo:hi] = w / w.sum()
  return out


def oracle_resize(image: np.ndarray, width: int, height: int, kernel="bilinear") -> np.ndarray:
  x = image.astype(np.float64)
  x = np.einsum("oj,hjc->hoc", _weights(x.shape[1], width, kernel), x)
  x = np.einsum("oi,iwc->owc", _weights(x.shape[0], height, kernel), x)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def smooth_image(h, w, seed=0):
  """A smooth random RGB image (resampling errors stay at the rounding level)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w] / max(h, w)
  channels = [
    sum(
      rng.uniform(-1, 1)
      * np.sin(2 * np.pi * (rng.uniform(0, 4) * yy + rng.uniform(0, 4) * xx + rng.uniform()))
      for _ in range(3)
    )
    for _ in range(3)
  ]
  return np.clip(128 + 40 * np.stack(channels, -1), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("width, height", [(400, 350), (350, 400), (64, 64), (500, 120)])
@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.9), (0.5, 2.0))])
def test_crop_boxes_within_bounds_scale_and_ratio(width, height, scale, ratio):
  rng = np.random.default_rng(0)
  boxes = np.array([augment.crop_box(rng, width, height, scale, ratio) for _ in range(2000)])
  left, top, right, bottom = boxes.T
  assert (
    (left >= 0).all() and (top >= 0).all() and (right <= width).all() and (bottom <= height).all()
  )
  w, h = right - left, bottom - top
  assert (w > 0).all() and (h > 0).all()
  # The fallback after 10 failed draws: the largest central box, ratio clamped to the range.
  aspect = min(max(width / height, ratio[0]), ratio[1])
  fw, fh = min(width, round(height * aspect)), min(height, round(width / aspect))
  fallback = (
    (width - fw) // 2,
    (height - fh) // 2,
    (width - fw) // 2 + fw,
    (height - fh) // 2 + fh,
  )
  drawn = ~(boxes == fallback).all(1)
  # Successful draws: area and ratio in range up to the rounding of the sides (+-0.5 px).
  fraction = (w * h / (width * height))[drawn]
  slack_w, slack_h = 0.5 / w[drawn], 0.5 / h[drawn]
  assert (fraction >= scale[0] * (1 - slack_w) * (1 - slack_h) - 1e-12).all()
  assert (fraction <= scale[1] * (1 + slack_w) * (1 + slack_h) + 1e-12).all()
  aspect = (w / h)[drawn]
  assert (aspect >= ratio[0] * (1 - slack_w) / (1 + slack_h) - 1e-12).all()
  assert (aspect <= ratio[1] * (1 + slack_w) / (1 - slack_h) + 1e-12).all()
  if (width, height) == (400, 350) and scale[0] == 0.08:  # the ranges are covered, not just met
    assert drawn.mean() > 0.95
    assert fraction.min() < scale[0] + 0.02 and fraction.max() > scale[1] - 0.05
    assert np.log(aspect).min() < np.log(ratio[0]) + 0.05
    assert np.log(aspect).max() > np.log(ratio[1]) - 0.05


def test_crop_box_positions_are_uniform():
  rng = np.random.default_rng(1)
  boxes = np.array([augment.crop_box(rng, 400, 350, (0.25, 0.25), (1.0, 1.0)) for _ in range(4000)])
  side = 187  # round(sqrt(0.25 * 400 * 350))
  assert set(boxes[:, 2] - boxes[:, 0]) == {side} and set(boxes[:, 3] - boxes[:, 1]) == {side}
  left = boxes[:, 0] / (400 - side)
  assert abs(left.mean() - 0.5) < 0.03 and abs(left.var() - 1 / 12) < 0.01


def test_crop_box_fallback_clamps_the_ratio():
  # No box of >= 90% of a 1000 x 10 strip has a ratio in [3/4, 4/3]: the central 13 x 10.
  rng = np.random.default_rng(0)
  assert augment.crop_box(rng, 1000, 10, (0.9, 1.0)) == (493, 0, 506, 10)
  assert augment.crop_box(rng, 10, 1000, (0.9, 1.0)) == (0, 493, 10, 506)
  assert augment.crop_box(rng, 30, 30, (1.0, 1.0), (2.0, 3.0)) == (0, 7, 30, 22)


def test_crop_box_is_deterministic_given_the_generator():
  a = [augment.crop_box(np.random.default_rng(5), 400, 350) for _ in range(3)]
  assert a[0] == a[1] == a[2]
  assert augment.crop_box(np.random.default_rng(6), 400, 350) != a[0]


@pytest.mark.parametrize("kernel", ["bilinear", "bicubic"])
@pytest.mark.parametrize("box", [(10, 20, 310, 330), (50, 60, 150, 140), (0, 0, 400, 350)])
def test_resized_crop_matches_numpy(kernel, box):
  image = smooth_image(350, 400)
  got = augment.resized_crop(Image.fromarray(image), box, 224, kernel)
  left, top, right, bottom = box
  want = oracle_resize(image[top:bottom, left:right], 224, 224, kernel)
  assert got.shape == (224, 224, 3) and got.dtype == np.uint8
  assert np.abs(got.astype(int) - want).max() <= 1


def test_flip_is_an_exact_mirror():
  image = Image.fromarray(smooth_image(350, 400))
  plain = augment.resized_crop(image, (30, 40, 250, 300), 64)
  flipped = augment.resized_crop(image, (30, 40, 250, 300), 64, flip=True)
  np.testing.assert_array_equal(flipped, plain[:, ::-1])
  x = smooth_image(8, 8)
  outs = [
    augment.RandomFlip().random_map({"image": x, "label": 3}, np.random.default_rng(i))
    for i in range(400)
  ]
  mirrored = [np.array_equal(o["image"], x[:, ::-1]) for o in outs]
  assert all(m or np.array_equal(o["image"], x) for m, o in zip(mirrored, outs))
  assert 0.4 < np.mean(mirrored) < 0.6 and all(o["label"] == 3 for o in outs)


@pytest.mark.parametrize("kernel", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
  "height, width, size, fraction, new",
  [
    (350, 400, 224, 0.875, (256, 292)),  # resize the shorter side to 256, central 224
    (400, 350, 224, 0.875, (292, 256)),
    (120, 90, 32, 1.0, (42, 32)),
    (32, 32, 32, 1.0, (32, 32)),  # the built-in benchmark: the identity
  ],
)
def test_resize_center_crop_matches_numpy(kernel, height, width, size, fraction, new):
  image = smooth_image(height, width, seed=3)
  got = augment.resize_center_crop(Image.fromarray(image), size, fraction, kernel)
  assert new == (
    round(size / fraction) if height <= width else int(round(size / fraction) * height / width),
    round(size / fraction) if width <= height else int(round(size / fraction) * width / height),
  )
  resized = image if new == (height, width) else oracle_resize(image, new[1], new[0], kernel)
  top, left = round((new[0] - size) / 2), round((new[1] - size) / 2)
  want = resized[top : top + size, left : left + size]
  assert got.shape == (size, size, 3)
  assert np.abs(got.astype(int) - want).max() <= 1
  if new == (height, width):
    np.testing.assert_array_equal(got, image)


def _encode(array, fmt, mode=None):
  buf = io.BytesIO()
  image = Image.fromarray(array)
  (image.convert(mode) if mode else image).save(buf, format=fmt)
  return buf.getvalue()


def test_decode_gives_rgb():
  rgb = smooth_image(20, 30)
  np.testing.assert_array_equal(np.asarray(augment.decode(_encode(rgb, "png"))), rgb)
  np.testing.assert_array_equal(np.asarray(augment.decode(rgb)), rgb)
  grey = rgb[..., 0]
  for source in (_encode(grey, "png"), grey, grey[..., None]):
    out = np.asarray(augment.decode(source))
    assert out.shape == (20, 30, 3) and (out == grey[..., None]).all()
  cmyk = np.asarray(augment.decode(_encode(rgb, "jpeg", "CMYK")))
  assert cmyk.shape == (20, 30, 3) and np.abs(cmyk.astype(int) - rgb).mean() < 8
  rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], -1)
  np.testing.assert_array_equal(np.asarray(augment.decode(_encode(rgba, "png"))), rgb)


def test_transforms_take_encoded_examples():
  image = smooth_image(350, 400)
  example = {"image": _encode(image, "png"), "label": np.int64(7), "file_name": b"x.png"}
  out = augment.RandomResizedCrop(224).random_map(example, np.random.default_rng(0))
  assert set(out) == {"image", "label"} and out["label"].dtype == np.int32 and out["label"] == 7
  assert out["image"].shape == (224, 224, 3) and out["image"].dtype == np.uint8
  # The same generator state gives the same box and flip as crop_box + resized_crop.
  rng = np.random.default_rng(0)
  box = augment.crop_box(rng, 400, 350)
  np.testing.assert_array_equal(
    out["image"], augment.resized_crop(Image.fromarray(image), box, 224, flip=rng.random() < 0.5)
  )
  evaluated = augment.ResizeCenterCrop(224).map(example)
  np.testing.assert_array_equal(
    evaluated["image"], augment.resize_center_crop(Image.fromarray(image), 224)
  )
  assert math.isclose(float(augment.WithMask(False).map(evaluated)["mask"]), 0.0)
