"""gradient_ascent_jax: gradient ascent as composable Optax transforms."""

from gradient_ascent_jax._src.alias import gradient_ascent
from gradient_ascent_jax._src.alias import maximize
from gradient_ascent_jax._src.carry_over import carry_over
from gradient_ascent_jax._src.progress import LogProgressState
from gradient_ascent_jax._src.progress import log_progress
from gradient_ascent_jax._src.reader import ProgressReader
from gradient_ascent_jax._src.schedules import warmup_decay_schedule
from gradient_ascent_jax._src.transforms import FlipSignState
from gradient_ascent_jax._src.transforms import MomentumState
from gradient_ascent_jax._src.transforms import ScaleByAdaptiveRmsState
from gradient_ascent_jax._src.transforms import ScaleByWarmupDecayState
from gradient_ascent_jax._src.transforms import clip_by_value
from gradient_ascent_jax._src.transforms import flip_sign
from gradient_ascent_jax._src.transforms import momentum
from gradient_ascent_jax._src.transforms import scale_by_adaptive_rms
from gradient_ascent_jax._src.transforms import scale_by_warmup_decay

# Between releases, the next minor version's .dev0: a wheel built from main sorts
# after the last release and before the next, and is never taken for either.
__version__ = "0.3.0.dev0"

__all__ = (
  "FlipSignState",
  "LogProgressState",
  "MomentumState",
  "ProgressReader",
  "ScaleByAdaptiveRmsState",
  "ScaleByWarmupDecayState",
  "carry_over",
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
