"""tpgm_jax: robust fine-tuning for JAX/optax.

TPGM (Trainable Projected Gradient Method, Tian et al., CVPR 2023) keeps each
fine-tuned tensor within a learned distance of its pre-trained value. This
package provides the projection as a pure function over pytrees
(:func:`project`), TPGM during fine-tuning as one optax transformation
(:func:`trainable_projection`), the projection with given radii (:func:`tpgm`,
MARS-PGM with fixed radii), the radius learning as jit-able functions
(:func:`radii_trainer`, :func:`learn_radii_post_hoc`); and, on the same core,
FTP (:func:`ftp`), SPD (:func:`spd`), DiGraP (:func:`digrap`), L2-SP
(:func:`l2sp`) and WiSE-FT (:func:`interpolate`).

Conventions shared by every function:

* Argument order: the current (or fine-tuned) tree comes first, the anchor
  (pre-trained) tree second: ``project(params, anchor, radii)``,
  ``interpolate(finetuned, pretrained, alpha=...)``,
  ``learn_radii_post_hoc(loss, finetuned, pretrained, ...)``. Transformations
  record the anchor from the params passed to ``init``.
* Masks are what ``optax.masked`` takes: ``None`` (every floating-point
  tensor), a pytree of bools (or a prefix), or a callable ``params -> bool
  pytree``; :func:`path_mask` builds one from parameter paths, spelled as
  ``jax.tree_util.keystr(path, simple=True, separator="/")`` spells them (a
  Flax NNX Variable's trailing ``value`` key dropped, so under
  ``nnx.Optimizer`` a mask means the same tensors at ``init`` and ``update``).
* Strengths, learning rates and a MARS-PGM radius are a number or an optax
  schedule of the step count (``optax.ScalarOrSchedule``), evaluated inside
  ``jax.jit`` at an int32 ``count`` kept in the transformation's state.
* LoRA: every method takes ``lora=lora_adapters(scale, a=..., b=...)``
  (opt-in) and then constrains each adapter's merged update ``s * A @ B``
  (anchor 0: the frozen base kernel) instead of ``A`` and ``B`` separately.
* Bad input raises ``ValueError`` naming the argument or the parameter path.
"""

from tpgm_jax._digrap import DiGraPState, digrap
from tpgm_jax._ftp import FTPState, ftp
from tpgm_jax._interpolate import interpolate
from tpgm_jax._l2sp import L2SPState, l2sp
from tpgm_jax._lora import LoRAAdapters, lora_adapters
from tpgm_jax._projection import channel_norms, clip_radii, distance_norms, init_radii, project
from tpgm_jax._radii import RadiiTrainer, learn_radii_post_hoc, radii_trainer
from tpgm_jax._spd import SPDState, spd
from tpgm_jax._transform import (
  LazyProjectionState,
  TPGMState,
  TrainableProjectionState,
  tpgm,
  trainable_projection,
)
from tpgm_jax._tree import check_finite, leaf_paths, path_mask

__version__ = "0.2.0"

__all__ = (
  "DiGraPState",
  "FTPState",
  "L2SPState",
  "LazyProjectionState",
  "LoRAAdapters",
  "RadiiTrainer",
  "SPDState",
  "TPGMState",
  "TrainableProjectionState",
  "channel_norms",
  "check_finite",
  "clip_radii",
  "digrap",
  "distance_norms",
  "ftp",
  "init_radii",
  "interpolate",
  "l2sp",
  "learn_radii_post_hoc",
  "leaf_paths",
  "lora_adapters",
  "path_mask",
  "project",
  "radii_trainer",
  "spd",
  "tpgm",
  "trainable_projection",
)
