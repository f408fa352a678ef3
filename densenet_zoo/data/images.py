"""Reading image files: one decoding path and one error for every file that cannot be read."""

from __future__ import annotations

from PIL import Image

from .._utils import DataError, PathLike

__all__ = ["UNREADABLE_IMAGE_ERRORS", "UnreadableImageError", "open_image", "probe_image"]

#: What PIL raises for a file it cannot decode: not an image (``UnidentifiedImageError`` is an
#: ``OSError``), truncated or damaged data, or a header claiming more pixels than PIL's
#: decompression-bomb limit (e.g. 100000x100000), which must not be allocated.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class UnreadableImageError(DataError):
    """An image file that cannot be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(f"{path}: unreadable image ({reason})")
        self.path, self.reason = str(path), reason


def _unreadable(path: PathLike, exc: BaseException) -> UnreadableImageError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UnreadableImageError(path, reason)


def open_image(path: PathLike, in_chans: int = 3) -> Image.Image:
    """Read an image as RGB (``in_chans=3``) or grayscale (``in_chans=1``).

    Palette, grayscale, CMYK, CIELAB, 16/32-bit integer and float images are converted (float ones by the
    range their values use, see :func:`_to_8bit`); transparent pixels are composited onto
    white, which is how viewers show them (``convert("RGB")`` would expose whatever colour sits
    under the transparency, often black). A file that cannot be decoded raises
    :class:`UnreadableImageError`.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return _to_mode(img, in_chans)
    except UNREADABLE_IMAGE_ERRORS as exc:
        raise _unreadable(path, exc) from None


def _to_mode(img: Image.Image, in_chans: int) -> Image.Image:
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8bit(img)
    return img.convert("L" if in_chans == 1 else "RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """A single-channel image of wide or float values as 8-bit grayscale, by the range its values use.

    Float images in 0..1 (the usual convention of float TIFFs) scale by 255, values in 0..255 stay, and
    16-bit ones (integer modes above 255) scale by 1/257; anything else is stretched from its minimum to
    its maximum. ``convert("L")`` alone would clip a 0..1 float image to black.
    """
    import numpy as np

    a = np.asarray(img, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError("the image holds nan or inf pixel values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif lo < 0.0 or hi > 65535.0 or (img.mode == "F" and hi > 255.0):
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    elif hi > 255.0 or img.mode.startswith("I;16"):
        a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def probe_image(path: PathLike) -> None:
    """Decode ``path`` once (JPEGs at reduced size, ``draft``) or raise :class:`UnreadableImageError`."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))
            img.load()
    except UNREADABLE_IMAGE_ERRORS as exc:
        raise _unreadable(path, exc) from None
