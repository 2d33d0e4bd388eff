"""Constants shared across histohub and its users (training/ imports them too).

Cheap to import: no torch, no numpy.
"""

from __future__ import annotations

#: Image files read as patches or training images (lower-case suffixes; compare with
#: ``path.suffix.lower()``, or ``name.lower().endswith(IMAGE_EXTENSIONS)``).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
