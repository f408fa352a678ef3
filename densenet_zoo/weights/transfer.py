"""One bounded HTTP(S) transfer into a file: a size limit, a per-read and an overall deadline, a progress bar.

A server cannot make a download run forever or fill the disk: the transfer stops as soon as it has
received more bytes than the file may have (the size the registry declares, else the server's
``Content-Length``, else :data:`MAX_UNDECLARED_BYTES`), when one read waits longer than ``read_timeout``,
or when the whole transfer has taken longer than ``deadline``. Every refusal is one line naming the URL.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .._utils import WeightsError

#: The most bytes taken from a URL whose size nobody declared (the largest DenseNet checkpoint is ~110 MB).
MAX_UNDECLARED_BYTES = 2 << 30
#: Seconds a whole download may take (``DENSENET_ZOO_DOWNLOAD_DEADLINE`` overrides it).
DEFAULT_DEADLINE_S = 3600.0
_CHUNK = 1 << 16


@dataclass(frozen=True)
class TransferLimits:
    """How long and how large one download may be.

    Attributes:
        read_timeout: seconds one read may wait for the server.
        deadline: seconds the whole transfer may take (a slow-drip server is cut off at it).
        max_bytes: bytes at most when neither the registry nor the server declares a size.
    """

    read_timeout: float = 60.0
    deadline: float = DEFAULT_DEADLINE_S
    max_bytes: int = MAX_UNDECLARED_BYTES

    @classmethod
    def from_env(cls, read_timeout: float = 60.0) -> "TransferLimits":
        """The defaults, with ``DENSENET_ZOO_DOWNLOAD_DEADLINE`` (seconds) read from the environment.

        Example::

            TransferLimits.from_env().deadline   # 3600.0 unless the variable says otherwise
        """
        text = os.environ.get("DENSENET_ZOO_DOWNLOAD_DEADLINE", "").strip()
        try:
            deadline = float(text) if text else DEFAULT_DEADLINE_S
        except ValueError:
            raise WeightsError(f"DENSENET_ZOO_DOWNLOAD_DEADLINE={text!r} is not a number of seconds; e.g. 3600") from None
        if not deadline > 0:
            raise WeightsError(f"DENSENET_ZOO_DOWNLOAD_DEADLINE={text!r} must be a positive number of seconds")
        return cls(read_timeout=read_timeout, deadline=deadline)


def transfer(url: str, dest: Path, final: Path, *, declared_size: Optional[int], limits: TransferLimits,
             progress: bool) -> None:
    """Download ``url`` into ``dest`` (created exclusively), within ``limits``.

    Args:
        url: an http(s) URL.
        dest: the temporary file to write; it must not exist (a planted file or link is refused).
        final: the file ``dest`` becomes once verified (named in messages and the progress bar).
        declared_size: the size the registry declares, if any; more bytes than that are refused.
        limits: the time and size bounds.
        progress: show a progress bar.

    Raises:
        WeightsError: one line naming the URL: HTTP error, an HTML page, too many bytes, too slow, cut short.
    """
    from tqdm.auto import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "densenet_zoo"})
    received, total, start = 0, None, time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=limits.read_timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            limit = _byte_limit(url, declared_size, total, limits)
            ctype = (resp.headers.get("Content-Type") or "").lower()
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                                desc=final.name, disable=not progress) as bar:
                while True:
                    # read1 returns what has arrived (at least one byte), so the deadline is checked
                    # between the drips of a slow server, not after 64 KiB of them.
                    chunk = resp.read1(_CHUNK)
                    if not chunk:
                        break
                    if received == 0:
                        _refuse_html(url, ctype, chunk)
                    received += len(chunk)
                    _within(url, received, limit, time.monotonic() - start, limits)
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL or the mirror (DENSENET_ZOO_MIRROR)") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(
            f"download of {url} failed after {received}" + (f" of {total}" if total else "") + f" bytes ({type(exc).__name__}: {reason}); "
            f"nothing was cached; retry, set DENSENET_ZOO_MIRROR to a reachable copy, or place the file at {final}"
        ) from None
    if total is not None and received != total:
        raise WeightsError(f"download of {url} stopped after {received} of {total} bytes; nothing was cached, retry")


def _byte_limit(url: str, declared: Optional[int], content_length: Optional[int], limits: TransferLimits) -> int:
    if declared is not None and content_length is not None and content_length != declared:
        raise WeightsError(f"{url} announces {content_length} bytes, but the weights have {declared}: a wrong file or "
                           "mirror; nothing was downloaded")
    for size in (declared, content_length):
        if size is not None:
            return size
    return limits.max_bytes


def _within(url: str, received: int, limit: int, elapsed: float, limits: TransferLimits) -> None:
    if received > limit:
        raise WeightsError(f"{url} sent more than the {limit} bytes the file may have; stopped there, nothing was cached")
    if elapsed > limits.deadline:
        raise WeightsError(f"download of {url} took longer than {limits.deadline:g} s ({received} bytes received); "
                           "stopped, nothing was cached; retry on a faster connection or raise DENSENET_ZOO_DOWNLOAD_DEADLINE")


def _refuse_html(url: str, ctype: str, chunk: bytes) -> None:
    if "text/html" in ctype or chunk.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        raise WeightsError(
            f"{url} returned an HTML page (Content-Type {ctype or 'unknown'}) instead of a weights file: "
            "an error or login page, or a wrong mirror URL; check the URL in a browser"
        )

