"""The thin bridge between absl scripts in ``scripts/`` and the library.

Scripts define flags and call library functions; this module only turns a script's ``main`` into a
process that ends with one line on stderr and exit code 2 for usage/configuration errors (never a
traceback), parses the few flag *value formats* the scripts share, and defines the flags the
scripts share: the data/backbone flags (:func:`define_model_flags`) and one flag per option of a
config dataclass (:func:`define_config_flags`; the option's type, default, choices and help live on
its field, ``field(metadata={"help": ...})``), read back parsed by :func:`config_values`.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tlkeras import progress
from tlkeras.data import DataConfig
from tlkeras.models import weights as weights_lib
from tlkeras.models.strategy import Strategy

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
        progress.mark_imports_done()
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


# --------------------------------------------------------------------------------------------------
# Flags generated from the config dataclasses: each option is defined once, on its field
# (``field(metadata={"help": ...})``; optional ``"choices"``, ``"flag"``: absl's kind where the
# annotation is not enough, ``"name"``: the flag's name where it is not the field's (TF Serving's),
# ``"lower_bound"``), and every script that takes it asks for it here. The library only describes
# its options; it never mentions flags.

HELP, CHOICES, FLAG_TYPE, FLAG_NAME, LOWER_BOUND = "help", "choices", "flag", "name", "lower_bound"


def flag_type(field: dataclasses.Field) -> str:
    """absl's kind of flag for ``field``: its metadata's ``flag``, ``enum`` with ``choices``, else
    from the annotation's first type (``bool``, ``int``, ``float``; anything else is a string)."""
    if FLAG_TYPE in field.metadata:
        return field.metadata[FLAG_TYPE]
    if CHOICES in field.metadata:
        return "enum"
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    first = annotation.replace(" ", "").split("|")[0]
    return {"bool": "boolean", "int": "integer", "float": "float"}.get(first, "string")


def field_default(field: dataclasses.Field) -> Any:
    """The library's default of ``field`` (an enum as its value; ``None`` where there is none)."""
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = None
    return default.value if isinstance(default, enum.Enum) else default


def config_options(config_cls: type) -> list[dataclasses.Field]:
    """The fields of ``config_cls`` that are options: those whose metadata carries a ``help``."""
    return [f for f in dataclasses.fields(config_cls) if HELP in f.metadata]


def define_config_flags(
    config_cls: type,
    *,
    only: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
    notes: Mapping[str, str] | None = None,
    flag_values: Any = None,
) -> dict[str, str]:
    """Define one flag per option of ``config_cls`` (``only`` those fields, none of ``exclude``):
    its kind, default, choices and help from the field. ``defaults`` replaces a flag's default
    (``None``: the library decides; ``notes`` says how), ``notes`` are appended to a flag's help.
    Returns ``{field name: flag name}`` for :func:`config_values`."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    defaults, notes = dict(defaults or {}), dict(notes or {})
    names: dict[str, str] = {}
    for field in config_options(config_cls):
        if (only is not None and field.name not in only) or field.name in exclude:
            continue
        name = field.metadata.get(FLAG_NAME, field.name)
        default = defaults.get(field.name, field_default(field))
        help_text = with_note(field.metadata[HELP], notes.get(field.name))
        kind = flag_type(field)
        if kind == "enum":
            choices = [str(c) for c in field.metadata[CHOICES]]
            flags.DEFINE_enum(name, default, choices, help_text, flag_values=fv)
        elif kind == "string":
            text = None if default is None else str(default)
            flags.DEFINE_string(name, text, help_text, flag_values=fv)
        elif kind in ("integer", "float"):
            bound = field.metadata.get(LOWER_BOUND)
            define = getattr(flags, f"DEFINE_{kind}")
            define(name, default, help_text, lower_bound=bound, flag_values=fv)
        else:
            getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=fv)
        names[field.name] = name
    return names


def with_note(help_text: str, note: str | None) -> str:
    """``help_text`` with a script's ``note``: ``"(...)"`` goes inside the help's closing
    parenthesis or sentence, ``", ..."``/``"; ..."`` continues its sentence, else a new one."""
    if not note:
        return help_text
    if note.startswith("(") and help_text.endswith(")."):
        return f"{help_text[:-2]}; {note[1:]}."
    if note.startswith("(") and help_text.endswith("."):
        return f"{help_text[:-1]} {note}."
    if note[0] in ",;" and help_text.endswith("."):
        return help_text[:-1] + note
    return f"{help_text} {note}"


def config_values(names: Mapping[str, str], flag_values: Any = None) -> dict[str, Any]:
    """``{field name: value}`` of the flags :func:`define_config_flags` defined (``names``, its
    return), each parsed for the library by its parser in ``PARSERS``, if any."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    out = {}
    for field_name, name in names.items():
        value = fv[name].value
        out[field_name] = PARSERS[name](value) if name in PARSERS else value
    return out


def define_max_bad_fraction() -> None:
    """Define ``--max_bad_fraction`` (``tlkeras.data.DataConfig``'s option) in this module; a
    script adopts it with ``flags.adopt_module_key_flags(cli)``."""
    define_config_flags(DataConfig, only=("max_bad_fraction",))


def define_split_flags(
    validation_data: str | None = None, notes: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``--validation_split --test_split`` (``DataConfig``'s options); with ``validation_data`` (a
    note on its help, may be ``""``) also ``--validation_data``."""
    from absl import flags

    if validation_data is not None:
        help_text = "Validation folder or tfds split (default: a stratified split of --data)."
        flags.DEFINE_string("validation_data", None, with_note(help_text, validation_data))
    return define_config_flags(DataConfig, only=("validation_split", "test_split"), notes=notes)


FINE_TUNE_AT_HELP = (
    "partial only: first trainable block (negative counts from the end; default: the top half)."
)


def define_strategy_flags(default: str, help_text: str) -> None:
    """``--strategy`` (one of ``tlkeras.Strategy``, ``default``) and ``--fine_tune_at``."""
    from absl import flags

    flags.DEFINE_enum("strategy", default, [s.value for s in Strategy], help_text)
    define_fine_tune_at()


def define_fine_tune_at() -> None:
    """``--fine_tune_at``: ``partial``'s first trainable block (``tlkeras.build_model``)."""
    from absl import flags

    flags.DEFINE_integer("fine_tune_at", None, FINE_TUNE_AT_HELP)


def define_tta(note: str) -> None:
    """``--tta``: test-time views, as ``tlkeras.analysis.tta.parse`` reads them; ``note``: what
    the script does with them."""
    from absl import flags

    flags.DEFINE_string(
        "tta",
        "none",
        "Test-time augmentation: none, flip, crops or flip,crops (crops=5, crop_fraction=F); "
        + note,
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


DATA_HELP = "Image folder (one subfolder per class), tfds:NAME[/CONFIG][:SPLIT], or digits[:A-B]."


def define_model_flags(weights_help: str = WEIGHTS_HELP, **defaults: Any) -> None:
    """Define ``--data --max_bad_fraction --backbone --backbone_kwargs --weights --image_size``
    with the offline transfer story's defaults (``tlkeras.models.weights``) unless ``defaults``
    (by flag name) says otherwise. Call at a script's module level, then
    ``flags.adopt_module_key_flags(cli)`` so ``--help`` lists them with the script's own."""
    from absl import flags

    defaults = {
        "data": weights_lib.DEFAULT_TARGET,
        "backbone": weights_lib.DEFAULT_BACKBONE,
        "backbone_kwargs": ",".join(
            f"{k}={v}" for k, v in weights_lib.DEFAULT_BACKBONE_KWARGS.items()
        ),
        "weights": weights_lib.SOURCE_PREFIX + weights_lib.DEFAULT_SOURCE,
        **defaults,
    }
    flags.DEFINE_string("data", defaults["data"], DATA_HELP)
    define_max_bad_fraction()
    flags.DEFINE_string("backbone", defaults["backbone"], "A keras.applications model name.")
    flags.DEFINE_string(
        "backbone_kwargs",
        defaults["backbone_kwargs"],
        "Backbone constructor arguments, e.g. alpha=0.25.",
    )
    flags.DEFINE_string("weights", defaults["weights"], weights_help)
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


# Flags whose text the library cannot take as is (flag name -> its parser; ``config_values``).
PARSERS: dict[str, Callable[[Any], Any]] = {
    "learning_rate": parse_learning_rate,
    "class_weight": parse_class_weight,
}
