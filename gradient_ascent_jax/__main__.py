"""``python -m gradient_ascent_jax``: the original usage examples."""

import sys

from gradient_ascent_jax._demo import main

if __name__ == "__main__":
  sys.exit(main())
