"""The thin bridge between absl scripts in ``scripts/`` and the library.

Scripts define flags and call library functions; this module only turns a script's ``main`` into a
process that ends with one line on stderr and exit code 2 for usage/configuration errors (never a
traceback), parses the few flag *value formats* the scripts share, and defines the data/backbone
flags the experiment scripts share (:func:`define_model_flags`). It never reads flag values.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from tlkeras.data import DataConfig
from tlkeras.models import weights as weights_lib

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Errors a user can cause and fix: their message is the whole story, so no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
)


def _prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "tlkeras"


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``prog: error: message`` as one line on stderr and exit with ``code``."""
    one_line = " ".join(str(message).split())
    print(f"{_prog()}: error: {one_line}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(main: Callable[[list[str]], Any], *, exit_now: bool = False) -> None:
    """``absl.app.run(main)`` with one-line errors and exit code 2 for bad flags or bad input.

    ``exit_now``: once ``main`` has returned, flush and leave at once (``os._exit``), skipping the
    interpreter's teardown of TensorFlow (1.5–2.5 s on 2 cores) that a finished script does not
    need; its files are written and closed, and a pre-started verifier sees its stdin close.
    """
    from absl import app, flags

    def parse_flags(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            fail(f"{e} (see --helpfull)")
        try:
            apply_deprecated_aliases(flags.FLAGS)
        except ValueError as e:
            fail(str(e))
        return rest

    def guarded_main(argv: list[str]) -> Any:
        try:
            code = main(argv)
        except USER_ERRORS as e:
            fail(str(e) or type(e).__name__)
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except Exception as e:
            # Library errors that carry an exit code (e.g. a lost worker: "re-run to resume").
            if isinstance(getattr(e, "exit_code", None), int):
                fail(str(e), e.exit_code)
            raise
        if not exit_now:
            return code
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0)

    app.run(guarded_main, flags_parser=parse_flags)


# Deprecated flag name -> the flag it forwards to (define_deprecated_alias).
_DEPRECATED: dict[str, str] = {}


def define_deprecated_alias(old: str, new: str, flag_values: Any = None) -> None:
    """Define ``--old`` as a deprecated spelling of the already defined ``--new``: given, it warns
    in one stderr line and sets ``--new`` (``apply_deprecated_aliases``, which ``run`` calls after
    parsing). absl's ``DEFINE_alias`` would forward silently."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_string(old, None, f"Deprecated: use --{new} (same meaning).", flag_values=fv)
    _DEPRECATED[old] = new


def apply_deprecated_aliases(flag_values: Any = None) -> None:
    """Forward each given deprecated flag to its new name with a warning on stderr; both given
    with different values raise ``ValueError``."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    for old, new in _DEPRECATED.items():
        if old not in fv or not fv[old].present:
            continue
        value = fv[new].parser.parse(fv[old].value)
        if fv[new].present and fv[new].value != value:
            raise ValueError(
                f"--{old} and --{new}: expected one value for the same setting, received "
                f"{fv[old].value!r} and {fv[new].value!r}; give --{new} only"
            )
        print(
            f"{_prog()}: warning: --{old} is deprecated; use --{new} (same meaning)",
            file=sys.stderr,
            flush=True,
        )
        fv[new].value = value
        fv[new].present = fv[new].present or 1


def define_max_bad_fraction() -> None:
    """Define ``--max_bad_fraction`` (``tlkeras.data.DataConfig``'s default) in this module; a
    script adopts it with ``flags.adopt_module_key_flags(cli)``."""
    from absl import flags

    flags.DEFINE_float(
        "max_bad_fraction",
        DataConfig.max_bad_fraction,
        "Fail when more than this fraction of a data folder's files are unusable (fewer are "
        "skipped and listed).",
    )


def parse_kwargs(text: str | None, flag: str = "--backbone_kwargs") -> dict[str, Any]:
    """Parse ``"alpha=0.25,include_preprocessing=True"`` into ``{"alpha": 0.25, ...}``.

    Values are Python literals where they parse as one (numbers, booleans, None, tuples) and plain
    strings otherwise.
    """
    if not text:
        return {}
    out: dict[str, Any] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(
                f"{flag}: expected comma-separated key=value pairs such as 'alpha=0.25', "
                f"received {text!r}"
            )
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_weights(text: str | None) -> str | None:
    """``imagenet`` | ``none`` | a weights-file path, as the library's ``weights`` argument."""
    return weights_lib.parse(text)


def weights_for_strategy(strategy: str, text: str | None, given: bool) -> str | None:
    """``--weights`` for ``--strategy``: ``scratch`` means random init, so only a ``--weights`` the
    user gave (``given``) conflicts with it (the library then says so); else :func:`parse_weights`."""
    if strategy == "scratch" and not given:
        return None
    return parse_weights(text)


WEIGHTS_HELP = "Pretrained weights: imagenet | PATH to a weights file | source:TASK."


def define_model_flags(weights_help: str = WEIGHTS_HELP) -> None:
    """Define ``--data --max_bad_fraction --backbone --backbone_kwargs --weights --image_size``
    with the offline transfer story's defaults (``tlkeras.models.weights``). Call at a script's module
    level, then ``flags.adopt_module_key_flags(cli)`` so ``--help`` lists them with the script's
    own."""
    from absl import flags

    flags.DEFINE_string(
        "data", weights_lib.DEFAULT_TARGET, "Image folder, tfds:NAME[:SPLIT] or digits[:A-B]."
    )
    define_max_bad_fraction()
    flags.DEFINE_string(
        "backbone", weights_lib.DEFAULT_BACKBONE, "A keras.applications model name."
    )
    flags.DEFINE_string(
        "backbone_kwargs",
        ",".join(f"{k}={v}" for k, v in weights_lib.DEFAULT_BACKBONE_KWARGS.items()),
        "Backbone constructor arguments, e.g. alpha=0.25.",
    )
    flags.DEFINE_string(
        "weights", weights_lib.SOURCE_PREFIX + weights_lib.DEFAULT_SOURCE, weights_help
    )
    define_image_size()


IMAGE_SIZE_HELP = (
    "Square input size in pixels, or auto: chosen from the data's resolution (the size source: "
    "weights were pre-trained at; the backbone's default for photos; about 3x the short side of "
    "small images such as CIFAR's 32 px). The run prints what it chose and why."
)


def define_image_size() -> None:
    """``--image_size``: an int or ``auto`` (``tlkeras.data.sizing.choose_image_size``)."""
    from absl import flags

    flags.DEFINE_string("image_size", weights_lib.AUTO_SIZE, IMAGE_SIZE_HELP)


_CANDIDATE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9]*)\s*(?:\((.*)\))?\s*(?:@(.+))?\s*$")


def parse_candidates(text: str, default_weights: str | None = "imagenet") -> list[tuple]:
    """Parse ``"MobileNet(alpha=0.25)@PATH;MobileNetV2(alpha=0.35)@imagenet;NASNetMobile"`` into
    ``rank_backbones`` candidates (weights default to ``default_weights``)."""
    out = []
    for item in (text or "").split(";"):
        if not item.strip():
            continue
        m = _CANDIDATE.match(item)
        if m is None:
            raise ValueError(
                f"--candidates: expected NAME[(key=value,...)][@WEIGHTS] separated by ';', "
                f"received {item.strip()!r}"
            )
        name, kwargs, weights = m.groups()
        out.append((name, parse_kwargs(kwargs, "--candidates"), weights or default_weights))
    if not out:
        raise ValueError(f"--candidates: expected at least one candidate, received {text!r}")
    return out


def parse_learning_rate(text: str) -> float | str:
    """``auto`` (the LR finder's suggestion, ``tlkeras.train``) or a positive number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(
            f"--learning_rate: expected auto or a finite number > 0, received {text!r}"
        )
    return value


def parse_class_weight(text: str | None) -> str | dict[int, float] | None:
    """``auto`` | ``none`` | ``"0:1.0,1:3.5"`` as ``TrainConfig.class_weight``."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    if text.strip().lower() == "auto":
        return "auto"
    out: dict[int, float] = {}
    for item in text.split(","):
        key, sep, value = item.partition(":")
        try:
            out[int(key)] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(
                f"--class_weight: expected auto, none or INDEX:WEIGHT pairs such as 0:1.0,1:3.5, "
                f"received {text!r}"
            )
    return out
