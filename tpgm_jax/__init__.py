"""tpgm_jax: robust fine-tuning for JAX/optax.

TPGM (Trainable Projected Gradient Method, Tian et al., CVPR 2023) keeps each
fine-tuned tensor within a learned distance of its pre-trained value. This
package provides the projection as a pure function over pytrees, the radius
learning (outer loop) as jit-able functions, and an optax transformation; and,
on the same core, the related methods FTP (:func:`ftp`), SPD (:func:`spd`),
L2-SP (:func:`l2sp`) and WiSE-FT (:func:`interpolate`).
"""

from tpgm_jax._ftp import FTPState
from tpgm_jax._ftp import ftp
from tpgm_jax._interpolate import interpolate
from tpgm_jax._l2sp import L2SPState
from tpgm_jax._l2sp import l2sp
from tpgm_jax._projection import channel_norms
from tpgm_jax._projection import clip_radii
from tpgm_jax._projection import distance_norms
from tpgm_jax._projection import init_radii
from tpgm_jax._projection import project
from tpgm_jax._radii import RadiiTrainer
from tpgm_jax._radii import learn_radii_post_hoc
from tpgm_jax._radii import radii_trainer
from tpgm_jax._spd import SPDState
from tpgm_jax._spd import spd
from tpgm_jax._transform import TPGMState
from tpgm_jax._transform import tpgm
from tpgm_jax._tree import check_finite
from tpgm_jax._tree import leaf_paths

__version__ = "0.1.0"

__all__ = (
    "FTPState",
    "L2SPState",
    "RadiiTrainer",
    "SPDState",
    "TPGMState",
    "channel_norms",
    "check_finite",
    "clip_radii",
    "distance_norms",
    "ftp",
    "init_radii",
    "interpolate",
    "l2sp",
    "learn_radii_post_hoc",
    "leaf_paths",
    "project",
    "radii_trainer",
    "spd",
    "tpgm",
)
