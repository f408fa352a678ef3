"""Files of a training run: atomic writes, the resumable state, metrics tables and plots."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .._utils import OutputKind, PathLike, RunError, atomic_write, printable, save_figure
from .run_state import check_run_state

try:  # POSIX advisory locks; Windows locks a byte range of the file instead
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

STATE_FILE = "state.pt"
STATE_FORMAT = 1
#: Held (locked) by the process that trains into a run folder; ignored when judging a folder empty.
LOCK_FILE = ".densenet_zoo.lock"


def save_run_state(state: Dict[str, Any], path: PathLike) -> Path:
    """Save a training state (plain dicts, lists, numbers, strings and tensors) atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def load_run_state(path: PathLike) -> Dict[str, Any]:
    """Load a training state with ``torch.load(weights_only=True)``: no code runs while loading."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} does not exist; --resume needs the output folder of a run that saved its state")
    if path.stat().st_size == 0:
        raise RunError(f"{path} is empty (0 bytes), not a training state; the run cannot be resumed from it: "
                       "start a new run with another --out")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say which and why, in one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunError(f"{path} is not a loadable training state ({reason}); start a new run with another --out") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise RunError(f"{path} is not a densenet_zoo training state (format {STATE_FORMAT}); start a new run with another --out")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise RunError(f"{path} lacks {', '.join(missing)}; it is not a complete training state: start a new run with another --out")
    return check_run_state(state, path)


_STATE_KEYS = ("config", "class_names", "model", "optimizer", "scheduler", "rng", "epoch", "batches_done",
               "global_step", "partial", "history", "best_acc1", "best_epoch", "bad_epochs")


def _user_files(out: Path) -> List[str]:
    """Names in ``out`` other than the lock file (sorted), or [] when ``out`` does not exist."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder; give a new or empty folder for the run")
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)


def check_new_run_folder(out: PathLike) -> None:
    """Refuse a folder that holds a run (resume it instead) or anybody's files (they would be replaced)."""
    out = Path(out)
    names = _user_files(out)
    run_files = [n for n in (STATE_FILE, "best.safetensors", "last.safetensors") if n in names]
    if run_files:
        raise RunError(f"{out} already holds a run ({run_files[0]}); pass --resume {out} to continue it or choose another --out")
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise RunError(f"--out {out} is not empty ({shown}) and holds no run to resume; the run would replace "
                       "those files: choose a new or empty folder")


class RunLock:
    """An exclusive lock on a run folder for the lifetime of a run: ``with RunLock("runs/x"): ...``.

    A second process asking for the same folder gets a :class:`RunError` at once instead of
    writing into it; the operating system drops the lock when the process ends, even when killed.
    The lock file is removed at the end; a run that wrote nothing leaves no new folder behind.
    """

    def __init__(self, out: PathLike) -> None:
        self.out = Path(out)
        self._file: Any = None
        self._created = False

    def __enter__(self) -> "RunLock":
        _user_files(self.out)  # --out naming a file: one clear error before mkdir fails on it
        self._created = not self.out.exists()
        for _ in range(10):  # the file may be removed by a run ending between our open and lock
            f = self._open()
            try:
                _lock(f)
            except OSError:
                f.close()
                raise RunError(f"{self.out} is in use by another run (it holds {self.out / LOCK_FILE}); "
                               "wait for that run to end or choose another --out") from None
            if _same_inode(f, self.out / LOCK_FILE):
                self._file = f
                return self
            f.close()
        raise RunError(f"could not lock {self.out / LOCK_FILE}; another process keeps replacing it")

    def _open(self) -> Any:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            return open(self.out / LOCK_FILE, "a+")
        except OSError as exc:
            raise RunError(f"cannot write the run folder {self.out} ({exc.strerror or exc}); choose a writable --out") from None

    def __exit__(self, *exc: Any) -> None:
        if self._file is None:
            return
        try:
            # Removed while still held: a process waiting on the old file sees it replaced and retries.
            (self.out / LOCK_FILE).unlink()
            if self._created and not _user_files(self.out):  # nothing written: leave no new folder
                self.out.rmdir()
        except OSError:
            pass  # best effort: a leftover empty folder or lock file is harmless
        finally:
            self._file.close()  # closing the file releases the lock
            self._file = None


def _lock(f: Any) -> None:
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # pragma: no cover - Windows
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)


def _same_inode(f: Any, path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == path.stat().st_ino
    except OSError:
        return False


def rng_state() -> Dict[str, Any]:
    """This process's torch RNG states (CPU and every CUDA device) as tensors."""
    import random

    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_metrics(out: PathLike, history: Sequence[Dict[str, Any]]) -> None:
    """``metrics.csv`` and ``metrics.jsonl``: one row per epoch, rewritten whole each time."""
    out = Path(out)
    if not history:
        return
    keys = list(history[0])

    def write_csv(f):
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)

    atomic_write(out / "metrics.csv", write_csv, binary=False)
    atomic_write(out / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in history)), binary=False)


def plot_curves(history: Sequence[Dict[str, Any]], path: PathLike) -> Path:
    """Loss and top-1 accuracy per epoch, train and val, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax1.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend()
    ax2.plot(epochs, [r["train_acc1"] for r in history], "o-", label="train")
    ax2.plot(epochs, [r["val_acc1"] for r in history], "o-", label="val")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("top-1 accuracy (%)"), ax2.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, path, overwrite=True)  # a run folder's own file


def plot_confusion(matrix: torch.Tensor, class_names: Sequence[str], path: PathLike, title: str = "", *,
                   overwrite: bool = False) -> Path:
    """Confusion matrix (rows: true class, columns: predicted), counts written in the cells; an existing
    ``path`` is replaced only when it is one of this package's figures, or with ``overwrite``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    class_names = [printable(c) for c in class_names]  # the font renders text, not undecodable bytes
    size = max(4.0, min(0.45 * n + 2, 20.0))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    if title:
        ax.set_title(printable(title))
    if n <= 30:
        top = matrix.max().item() or 1
        for i in range(n):
            for j in range(n):
                v = int(matrix[i, j])
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > top / 2 else "black")
    return save_figure(fig, path, overwrite=overwrite)


def write_json(path: PathLike, obj: Any, kind: Optional[OutputKind] = None, overwrite: bool = False) -> Path:
    """``obj`` as indented JSON; with ``kind``, an existing foreign file is refused unless ``overwrite``."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), binary=False, kind=kind,
                        overwrite=overwrite)


def summarize(history: List[Dict[str, Any]]) -> str:
    r = history[-1]
    return (
        f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} acc {r['train_acc1']:.2f}% | "
        f"val loss {r['val_loss']:.4f} acc@1 {r['val_acc1']:.2f}% acc@5 {r['val_acc5']:.2f}% | "
        f"{r['train_images_per_s']:.0f} img/s, lr {r['lr']:.3g}"
    )
