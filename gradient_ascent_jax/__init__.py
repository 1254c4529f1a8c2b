"""gradient_ascent_jax: gradient ascent as composable Optax transforms."""

from gradient_ascent_jax.alias import gradient_ascent
from gradient_ascent_jax.alias import maximize
from gradient_ascent_jax.progress import LogProgressState
from gradient_ascent_jax.progress import log_progress
from gradient_ascent_jax.schedules import warmup_decay_schedule
from gradient_ascent_jax.transforms import FlipSignState
from gradient_ascent_jax.transforms import MomentumState
from gradient_ascent_jax.transforms import ScaleByAdaptiveRmsState
from gradient_ascent_jax.transforms import ScaleByWarmupDecayState
from gradient_ascent_jax.transforms import clip_by_value
from gradient_ascent_jax.transforms import flip_sign
from gradient_ascent_jax.transforms import momentum
from gradient_ascent_jax.transforms import scale_by_adaptive_rms
from gradient_ascent_jax.transforms import scale_by_warmup_decay

__version__ = "0.1.0"

__all__ = (
    "FlipSignState",
    "LogProgressState",
    "MomentumState",
    "ScaleByAdaptiveRmsState",
    "ScaleByWarmupDecayState",
    "clip_by_value",
    "flip_sign",
    "gradient_ascent",
    "log_progress",
    "maximize",
    "momentum",
    "scale_by_adaptive_rms",
    "scale_by_warmup_decay",
    "warmup_decay_schedule",
)
