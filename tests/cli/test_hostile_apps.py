"""The application side against hostile input: run folders, data files, images, inference inputs,
export paths. Each case names what a user did; the package must refuse clearly or cope, and lose nothing."""

import csv
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

import densenet_zoo as dz
from densenet_zoo.data.images import UnreadableImageError, open_image
from densenet_zoo.data.splits import check_images, load_splits
from densenet_zoo.data.transforms import resolve_preprocessing
from densenet_zoo.train import run_files as io
from densenet_zoo._utils import DataError, RunError
from densenet_zoo.cli import main
from densenet_zoo.infer.predict import Predictor
from densenet_zoo.train import finetune

from _train_helpers import TINY, base_options, default_sigint, digits_subset
from _marks import needs_native_bf16

pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
TINY_JSON = '{"growth_rate": 8, "block_config": [2, 2], "num_init_features": 16, "small_inputs": true}'


def _tiny_flags(data, out, *extra):
    return ["finetune", "--data", str(data), "--out", str(out), "--model-args", TINY_JSON, "--image-size", "16",
            "--batch-size", "8", "--augment", "light", "--threads", "1", "--no-progress", *extra]


def _bomb_png(path: Path, side: int = 100_000) -> Path:
    """A valid PNG header claiming side x side pixels (the data is one tiny IDAT)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits_subset(tmp_path_factory.mktemp("hostile") / "digits", classes=3, train_per_class=6, val_per_class=2)


# -- 1. files of the user are never replaced ---------------------------------------------------


def test_a_folder_with_foreign_files_is_refused_and_left_as_it_was(data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    files = {"config.json": "{\"mine\": 1}\n", "metrics.csv": "a,b\n1,2\n", "curves.png": "not really a png"}
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(RunError, match="is not empty .*choose a new or empty folder"):
        finetune(**base_options(data, out, epochs=1))
    assert {p.name: p.read_text() for p in out.iterdir()} == files  # no lock file left either


def test_a_second_run_into_a_locked_folder_fails_at_once(data, tmp_path):
    out = tmp_path / "run"
    with io.RunLock(out):  # what a running finetune holds
        t = time.perf_counter()
        with pytest.raises(RunError, match=f"{out} is in use by another run"):
            finetune(**base_options(data, out, epochs=1))
        with pytest.raises(RunError, match="in use by another run"):
            finetune(resume=str(out))
        assert time.perf_counter() - t < 5
        assert [p.name for p in out.iterdir()] == [io.LOCK_FILE]  # the refused runs wrote nothing
    assert not out.exists()  # a lock that guarded nothing leaves no folder


def test_a_run_that_fails_on_its_input_leaves_no_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finetune(**base_options(tmp_path / "missing", tmp_path / "run", epochs=1))
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(240)
def test_two_cli_runs_started_together_one_refused(data, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "densenet_zoo", *_tiny_flags(data, out, "--epochs", "200")]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.time() + 180
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert loser.returncode == 1 and winner.poll() is None  # one refused, the other still training
        line = _one_error_line(loser.stderr.read())
        assert str(out) in line and ("in use by another run" in line or "already holds a run" in line), line
        again = subprocess.run([sys.executable, "-m", "densenet_zoo", "finetune", "--resume", str(out)],
                               cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert again.returncode == 1 and "in use by another run" in _one_error_line(again.stderr)
    finally:
        for p in procs:
            p.kill()
            p.wait(30)


@pytest.mark.timeout(240)
def test_ctrl_c_during_finetune_says_how_to_resume_and_the_resume_works(data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "densenet_zoo", *_tiny_flags(data, out, "--epochs", "200", "--save-every", "1")],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        deadline = time.time() + 120
        while not (out / "state.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    note, line = [text for text in err.splitlines() if text.strip()]  # at once, then when it has stopped
    assert note.startswith("finetune: Ctrl-C: stopping after this step") and "Traceback" not in err
    assert line.startswith("densenet-zoo finetune: interrupted") and f"densenet-zoo finetune --resume {out}" in line
    r = subprocess.run([sys.executable, "-m", "densenet_zoo", "finetune", "--resume", str(out), "--epochs", "1", "--threads", "1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# -- 2. decompression bombs and other unreadable images -----------------------------------------


def test_a_decompression_bomb_is_one_unreadable_image_everywhere(data, checkpoint, tmp_path, capsys):
    bomb = _bomb_png(data / "train" / "1" / "bomb.png")
    try:
        with pytest.raises(UnreadableImageError, match="bomb.png: unreadable image .*exceeds limit"):
            open_image(bomb)
        good, bad = check_images([(str(bomb), 1)])
        assert good == [] and bad[0][0] == str(bomb)
        with pytest.raises(DataError, match="bomb.png: unreadable image"):
            check_images([(str(bomb), 1)], strict=True)
        # finetune skips it with a warning, or stops with one line under --strict-data
        result = finetune(**base_options(data, tmp_path / "run", epochs=1))
        assert result["skipped_images"] == 1 and "warning: skipped 1 unreadable" in capsys.readouterr().err
        assert main(_tiny_flags(data, tmp_path / "strict", "--epochs", "1", "--strict-data")) == 1
        assert "bomb.png: unreadable image" in _one_error_line(capsys.readouterr().err)
        # evaluate: the same, on a folder holding the bomb
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data / "train"), "--out", str(tmp_path / "ev"),
                     "--strict-data"]) == 1
        assert "bomb.png" in _one_error_line(capsys.readouterr().err)
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data / "train"), "--out", str(tmp_path / "ev")]) == 0
        capsys.readouterr()
        # predict: the bomb is reported, every other image is predicted
        images = sorted((data / "train" / "1").glob("*.png"))
        assert main(["predict", "--checkpoint", str(checkpoint), str(data / "train" / "1"), "--csv", str(tmp_path / "p.csv"), "-q"]) == 0
        captured = capsys.readouterr()
        assert "bomb.png: unreadable image" in captured.err and "Traceback" not in captured.err
        rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
        assert len(rows) == len(images) and sum(bool(r["error"]) for r in rows) == 1
        assert all(r["top1"] for r in rows if not r["error"])
    finally:
        bomb.unlink()


# -- 3. tracebacks where one line belongs ----------------------------------------------------------


def test_resume_from_an_empty_or_truncated_state(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.pt").write_bytes(b"")
    assert main(["finetune", "--resume", str(run)]) == 1
    assert "state.pt is empty" in _one_error_line(capsys.readouterr().err)
    torch.save({"format": 1}, run / "state.pt")  # a state missing its parts
    assert main(["finetune", "--resume", str(run)]) == 1
    assert "not a complete training state" in _one_error_line(capsys.readouterr().err)


def test_os_errors_are_one_line(data, checkpoint, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out in (a_file, a_file / "sub"):  # --out is a file; --out below a file
        assert main(_tiny_flags(data, out, "--epochs", "1")) == 1
        assert str(a_file) in _one_error_line(capsys.readouterr().err)
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(a_file / "m.pt")]) == 1
    assert "a_file" in _one_error_line(capsys.readouterr().err)
    folder = tmp_path / "csv_is_a_folder"
    folder.mkdir()
    assert main(["predict", "--checkpoint", str(checkpoint), str(data / "val"), "--csv", str(folder), "-q"]) == 1
    assert "--csv" in _one_error_line(capsys.readouterr().err)
    assert a_file.read_text() == "keep me" and list(folder.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_out_folder_is_one_line(data, tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(_tiny_flags(data, locked / "run", "--epochs", "1")) == 1
        assert "choose a writable --out" in _one_error_line(capsys.readouterr().err)
    finally:
        locked.chmod(0o700)


# -- 4. output lost or input refused over text encodings ----------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="file names are UTF-16 there")
def test_predict_csv_with_a_file_name_that_is_not_utf8(data, checkpoint, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    src = next((data / "val" / "0").glob("*.png")).read_bytes()
    (folder / "plain.png").write_bytes(src)
    odd = os.path.join(os.fsencode(folder), b"caf\xe9.png")  # Latin-1 name, as copied from an old disk
    with open(odd, "wb") as f:
        f.write(src)
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), str(folder), "--csv", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "caf\\xe9.png:" in printed
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == ["caf\\xe9.png", "plain.png"]
    assert all(r["top1"] in ("0", "1", "2") for r in rows)


@pytest.mark.skipif(sys.platform == "win32", reason="file names are UTF-16 there")
def test_a_class_folder_whose_name_is_not_utf8(data, tmp_path, capsys):
    odd = os.fsdecode(b"caf\xe9")
    torch.manual_seed(0)
    ckpt = dz.save_model(dz.DenseNet(**TINY, num_classes=2).eval(), tmp_path / "odd.safetensors", class_names=["0", odd],
                         preprocessing={"size": 16, "crop_pct": 1.0, "interpolation": "bilinear"})
    folder = tmp_path / "val"
    (folder / "0").mkdir(parents=True)
    os.makedirs(os.path.join(os.fsencode(folder), b"caf\xe9"))
    for name, src in (("0", "0"), (odd, "1")):
        for p in list((data / "val" / src).glob("*.png")):
            (folder / name / p.name).write_bytes(p.read_bytes())
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(folder), "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "confusion.png").stat().st_size > 0
    assert main(["predict", "--checkpoint", str(ckpt), str(folder), "--csv", str(tmp_path / "p.csv"), "-q", "--top-k", "2"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert len(rows) == 4 and all({r["top1"], r["top2"]} == {"0", "caf\\xe9"} for r in rows)
    assert "caf\\xe9" in capsys.readouterr().out


def test_a_csv_dataset_saved_by_excel_with_a_bom(data, tmp_path):
    lines = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted((data / "train").rglob("*.png"))]
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes("\r\n".join(lines).encode("utf-8-sig"))
    splits = load_splits(csv_path, val_split=0.25)
    assert splits.class_names == ["0", "1", "2"] and len(splits.train) + len(splits.val) == len(lines) - 1
    csv_path.write_bytes("path,label\r\ncaf\xe9.png,1\r\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text .*save the CSV as UTF-8"):
        load_splits(csv_path)


# -- 5. unclear or missing errors ----------------------------------------------------------------


def _tiny_eval():
    torch.manual_seed(0)
    model = dz.DenseNet(**TINY, num_classes=5).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.numerics
@needs_native_bf16
def test_the_bf16_optimized_network_takes_the_usual_inputs():
    model = _tiny_eval()
    fast = dz.optimize_for_inference(model, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for given in (x, x.double(), x.bfloat16()):  # fp32 is the usual input; fp64 from numpy
            got = fast(given)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0)
        with pytest.raises(TypeError, match="expects a float image batch .*got torch.uint8"):
            fast((x * 255).clamp(0, 255).to(torch.uint8))


def test_the_optimized_network_refuses_backward_and_training_clearly():
    fast = dz.optimize_for_inference(_tiny_eval())
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        fast(x)
    with pytest.raises(RuntimeError, match="inference-only"):
        fast.train()
    with torch.no_grad():
        assert fast(x).shape == (2, 5)  # under no_grad a grad-requiring input is fine


@pytest.mark.numerics
@needs_native_bf16
def test_onnx_of_the_bf16_optimized_network_is_refused(tmp_path):
    fast = dz.optimize_for_inference(_tiny_eval(), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="ONNX of a bfloat16 model"):
        dz.export(fast, tmp_path / "m.onnx", "onnx", image_size=32)
    assert not (tmp_path / "m.onnx").exists()


def test_outputs_that_are_an_input_are_refused(checkpoint, data, tmp_path, capsys):
    before = checkpoint.read_bytes()
    link = tmp_path / "same.safetensors"
    link.symlink_to(checkpoint)
    for out in (checkpoint, link):
        assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 1
        assert "same file as --checkpoint" in _one_error_line(capsys.readouterr().err)
        assert main(["convert", str(checkpoint), str(out)]) == 1
        assert "same file as input" in _one_error_line(capsys.readouterr().err)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data / "val"), "--out", str(data / "val" / "0")]) == 1
    assert "inside --data" in _one_error_line(capsys.readouterr().err)
    assert not (data / "val" / "0" / "confusion.png").exists()
    image = next((data / "val" / "0").glob("*.png"))
    image_bytes = image.read_bytes()
    assert main(["predict", "--checkpoint", str(checkpoint), str(data / "val"), "--csv", str(image), "-q"]) == 1
    assert "same file as input" in _one_error_line(capsys.readouterr().err)
    assert checkpoint.read_bytes() == before and image.read_bytes() == image_bytes


def test_a_zero_image_size_is_refused_not_replaced_by_224(data, tmp_path, capsys):
    with pytest.raises(DataError, match="image size must be a positive integer, got 0"):
        resolve_preprocessing({"size": 224}, image_size=0)
    assert main(_tiny_flags(data, tmp_path / "run", "--image-size", "0")) == 1
    assert "--image-size must be a positive integer" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_info_refuses_a_zero_image_size(capsys):
    assert main(["info", "densenet121", "--image-size", "0"]) == 1
    assert "--image-size must be a positive integer" in _one_error_line(capsys.readouterr().err)
    assert main(["info", "densenet_bc_100", "--image-size", "40"]) == 0
    assert "at 40x40" in capsys.readouterr().out


@pytest.mark.timeout(180)
def test_a_run_started_with_a_relative_data_path_resumes_from_elsewhere(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data.parent)
    out = tmp_path / "run"
    finetune(**base_options(Path(data.name), out, epochs=1))
    monkeypatch.chdir(tmp_path)  # another working directory: the saved relative path would miss
    assert finetune(resume=str(out), epochs=2)["epochs_run"] == 2
    # the same folder named absolutely, or with a trailing ./, is the same data
    assert finetune(resume=str(out), epochs=2, data=str(data))["epochs_run"] == 2
    assert finetune(resume=str(out), epochs=2, data=os.path.relpath(data) + "/.")["epochs_run"] == 2
    other = digits_subset(tmp_path / "other", classes=3, train_per_class=6, val_per_class=2)
    with pytest.raises(ValueError, match="cannot change data"):
        finetune(resume=str(out), data=str(other))


def test_predictor_keeps_going_past_unreadable_files(checkpoint, tmp_path):
    bomb = _bomb_png(tmp_path / "bomb.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = tmp_path / "ok.png"
    from PIL import Image

    Image.new("RGB", (20, 20), (10, 200, 30)).save(good)
    results = Predictor.from_checkpoint(checkpoint).predict([bomb, text, good], progress=False)
    assert [r.error is None for r in results] == [False, False, True]
    assert "exceeds limit" in results[0].error and results[2].labels


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_predict_refuses_a_named_pipe_instead_of_blocking_on_it(checkpoint, tmp_path, capsys):
    fifo = tmp_path / "images.png"
    os.mkfifo(fifo)
    assert main(["predict", "--checkpoint", str(checkpoint), str(fifo), "-q"]) == 1
    assert "not a regular file or folder" in _one_error_line(capsys.readouterr().err)
