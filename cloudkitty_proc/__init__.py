"""cloudkitty_proc: a multi-worker metering/rating processor."""

import warnings

# eventlet prints a plain Warning at import time; it is not actionable for
# our users (we use it only for a GreenPool, see doc/source/design.rst).
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

__version__ = "0.1.0"
