"""Import TensorFlow without its C++ start-up chatter on stderr.

TensorFlow prints oneDNN/CUDA notices through absl's C++ logging before Python can configure it, and
``TF_CPP_MIN_LOG_LEVEL`` does not reach all of them. Scripts promise one-line errors on stderr, so the
import runs with file descriptor 2 pointed at /dev/null. Errors raised by the import itself still surface
(the descriptor is restored before the exception propagates). ``TLKERAS_TF_LOGS=1`` keeps the chatter.
"""

import os
import sys

if "tensorflow" not in sys.modules and not os.environ.get("TLKERAS_TF_LOGS"):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        _saved = os.dup(2)
    except OSError:  # no stderr descriptor (embedded interpreters): nothing to silence
        _saved = None
    if _saved is not None:
        _null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(_null, 2)
        try:
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
        finally:
            os.dup2(_saved, 2)
            os.close(_saved)
            os.close(_null)
