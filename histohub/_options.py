"""Every option of feature extraction, its allowed values, and the one check of them.

The library's entry points (``extract_features``, ``extract_slide``, ``SlideExtractor``,
``slide_patches``, ``cohort_patches``) and ``Tiling`` check the options they are given
with ``check_options`` before anything runs; the command line checks its flags with the
same rules, named as flags (``--batch-size 0``). Upper bounds are what this machine can
honour (``_limits``). Torch-free: the command line's ``--help`` imports it.
"""

from __future__ import annotations

from typing import Any

from histohub._limits import MAX_COUNT, max_batch_size, max_workers
from histohub.errors import check_option

#: Plausible microns per pixel; values outside are metadata defaults (e.g. 72 dpi), not scans.
#: Also the range allowed for ``mpp`` and ``target_mpp`` options (0.25 at 40x, 0.5 at 20x).
MPP_RANGE = (0.05, 50.0)
#: The tissue masks (``histohub.tissue_mask``): 'contours' (extraction's default), the
#: paper's 'hsv' rule, 'otsu'.
MASK_METHODS = ("contours", "hsv", "otsu")
#: How a patch read at another size is resized to the model's input (PIL's filters).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
#: ``torch.compile``: always, never, or "auto" (on a CPU, for jobs large enough to repay it).
COMPILE_CHOICES = (False, True, "auto")
#: Autocast: off, bfloat16 (True), or the dtype named.
AMP_CHOICES = (False, True, "bf16", "bfloat16", "fp16", "float16")


def _rules() -> dict[str, dict[str, Any]]:
    """Option -> ``errors.check_option``'s rule (bounds read from the machine when asked)."""
    mpp = {"low": MPP_RANGE[0], "high": MPP_RANGE[1], "optional": True}
    return {
        "batch_size": {"integer": True, "low": 1, "high": max_batch_size()},
        "amp": {"choices": AMP_CHOICES},
        "compile": {"choices": COMPILE_CHOICES},
        "num_workers": {"integer": True, "low": 0, "high": max_workers()},
        "read_threads": {"integer": True, "low": 1, "high": min(8, max_workers())},
        "max_patches": {"integer": True, "low": 1, "high": MAX_COUNT, "optional": True},
        "mpp": mpp, "target_mpp": mpp,
        "min_foreground": {"low": 0, "high": 1},
        "mask": {"choices": MASK_METHODS},
        "patch_size": {"integer": True, "low": 1},
        "interpolation": {"choices": INTERPOLATIONS},
    }


#: Command-line flags whose name is not the option's with dashes.
_FLAGS = {"num_workers": "--workers"}


def check_options(*, cli: bool = False, **options: Any) -> None:
    """Check extraction options before anything runs.

    Args:
        cli: name the options as the command line does (``--batch-size 0``).
        **options: option name -> value, any of ``batch_size``, ``amp``, ``compile``,
            ``num_workers``, ``read_threads``, ``max_patches``, ``mpp``, ``target_mpp``,
            ``min_foreground``, ``mask``, ``patch_size``, ``interpolation``.

    Raises:
        OptionError: (a ValueError) naming the first bad option and its allowed values,
            on one line.

    >>> check_options(patch_size=0)
    Traceback (most recent call last):
    histohub.errors.OptionError: patch_size=0: must be an integer >= 1
    """
    rules = _rules()
    for name, value in options.items():
        flag = _FLAGS.get(name, "--" + name.replace("_", "-")) if cli else None
        check_option(name, value, flag=flag, **rules[name])
