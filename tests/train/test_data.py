"""Datasets, image reading, preprocessing and the digits sample data."""

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

import densenet_zoo as dz

from densenet_zoo._utils import IMAGENET_MEAN, IMAGENET_STD
from densenet_zoo.data.dataset import ImageDataset
from densenet_zoo.data.images import open_image
from densenet_zoo.data.sample_data import write_sample_data
from densenet_zoo.data.splits import check_images, load_splits
from densenet_zoo.data.transforms import eval_transform, resolve_preprocessing, train_transform


def _png(path, value=128, size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, value // 2, 255 - value)
    Image.new(mode, size, color).save(path)
    return path


def _folder(root, classes=("a", "b", "c"), n=5):
    for ci, c in enumerate(classes):
        for i in range(n):
            _png(root / c / f"{i}.png", value=40 * ci + i)
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "digits"
    return root, write_sample_data("digits", root)


def test_digits_sample_data_is_sklearn_digits_split_per_class(digits):
    from sklearn.datasets import load_digits

    root, counts = digits
    ref = load_digits()
    assert counts["train"] + counts["val"] == len(ref.target) == 1797
    splits = load_splits(root)
    assert splits.class_names == [str(i) for i in range(10)]
    assert len(splits.train) == counts["train"] and len(splits.val) == counts["val"]
    names = {p.split("/")[-1] for p, _ in splits.train} | {p.split("/")[-1] for p, _ in splits.val}
    assert len(names) == 1797  # disjoint and complete
    for part in (splits.train, splits.val):  # every digit on both sides
        assert sorted({y for _, y in part}) == list(range(10))
    # Pixels and labels equal scikit-learn's, scaled from 0..16 to 0..255.
    for path, label in splits.val[::37]:
        i = int(path.split("/")[-1][:-4])
        assert label == ref.target[i]
        img = np.asarray(Image.open(path))
        assert np.abs(img.astype(float) - ref.images[i] * 255 / 16).max() <= 0.5


def test_sample_data_is_reused_and_refuses_foreign_folders(digits, tmp_path):
    root, counts = digits
    assert write_sample_data("digits", root) == counts  # idempotent: same split, nothing rewritten
    other = tmp_path / "mine"
    _png(other / "photo.png")
    with pytest.raises(ValueError, match="not empty"):
        write_sample_data("digits", other)
    assert (other / "photo.png").exists()
    with pytest.raises(ValueError, match="unknown sample dataset"):
        write_sample_data("mnist", tmp_path / "m")


def test_one_folder_split_is_fixed_by_the_seed_and_stratified(tmp_path):
    root = _folder(tmp_path / "d", n=10)
    a, b = load_splits(root, val_split=0.3, seed=1), load_splits(root, val_split=0.3, seed=1)
    assert a.train == b.train and a.val == b.val
    assert load_splits(root, val_split=0.3, seed=2).val != a.val
    assert len(a.val) == 9 and len(a.train) == 21
    assert set(a.val).isdisjoint(a.train)
    assert [sum(1 for _, y in a.val if y == c) for c in range(3)] == [3, 3, 3]


def test_train_val_folders_and_csv(tmp_path):
    root = tmp_path / "tv"
    _folder(root / "train"), _folder(root / "val", n=2)
    s = load_splits(root)
    assert (len(s.train), len(s.val), s.class_names) == (15, 6, ["a", "b", "c"])
    _folder(tmp_path / "imgs", classes=("x", "y"), n=4)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for c in ("x", "y"):
            for i in range(4):
                w.writerow([f"imgs/{c}/{i}.png", f"label_{c}"])
    s = load_splits(tmp_path / "labels.csv", val_split=0.25)
    assert s.class_names == ["label_x", "label_y"] and len(s.train) == 6 and len(s.val) == 2
    assert all(p.startswith(str(tmp_path / "imgs")) for p, _ in s.train)


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("one_class", "at least 2 class folders"),
    ("empty_class", "holds no images"),
    ("unsupported", "unsupported image type '.heic'"),
    ("val_extra", "that .*train lacks"),
    ("bad_csv", "expected 'path,label'"),
])
def test_bad_datasets_give_one_line_errors(tmp_path, case, match):
    root = tmp_path / "d"
    if case == "one_class":
        _folder(root, classes=("only",))
    elif case == "empty_class":
        _folder(root)
        (root / "empty").mkdir()
    elif case == "unsupported":
        _folder(root)
        (root / "a" / "x.heic").write_bytes(b"\0" * 16)
    elif case == "val_extra":
        _folder(root / "train"), _folder(root / "val", classes=("a", "b", "zz"))
    elif case == "bad_csv":
        _folder(tmp_path / "imgs")
        root = tmp_path / "l.csv"
        root.write_text("imgs/a/0.png,a\nimgs/b/0.png\n")
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        load_splits(root)
    assert "\n" not in str(err.value)


def test_grayscale_palette_rgba_and_16bit_images_become_rgb(tmp_path):
    gray = _png(tmp_path / "g.png", value=77, mode="L")
    assert np.asarray(open_image(gray)).tolist()[0][0] == [77, 77, 77]
    rgba = tmp_path / "t.png"
    im = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: shows the white background
    im.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black over white
    im.save(rgba)
    arr = np.asarray(open_image(rgba))
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[0, 2].tolist() == [10, 20, 30]
    assert abs(int(arr[0, 1, 0]) - 127) <= 1
    pal = tmp_path / "p.png"
    Image.new("P", (4, 4), 0).save(pal, transparency=0)
    assert np.asarray(open_image(pal))[0, 0].tolist() == [255, 255, 255]
    deep = tmp_path / "d16.png"
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(deep)
    assert np.asarray(open_image(deep)).max() == 255
    assert open_image(rgba, in_chans=1).mode == "L"


def test_corrupt_images_are_reported_with_their_path(tmp_path):
    good = _png(tmp_path / "a" / "ok.png")
    garbage = tmp_path / "a" / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    truncated = tmp_path / "a" / "trunc.png"
    full = _png(tmp_path / "big.png", size=(64, 64)).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    samples = [(str(good), 0), (str(garbage), 0), (str(truncated), 1)]
    ok, bad = check_images(samples)
    assert ok == [(str(good), 0)]
    assert [p for p, _ in bad] == [str(garbage), str(truncated)]
    with pytest.raises(ValueError, match="garbage.png: unreadable image"):
        check_images(samples, strict=True)


def test_preprocessing_defaults_and_weights_dicts():
    pre = resolve_preprocessing(None, 32)
    assert pre == {"size": 32, "crop_pct": 1.0, "interpolation": "bilinear", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    timm_cfg = {"input_size": (3, 288, 288), "crop_pct": 0.95, "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert resolve_preprocessing(timm_cfg)["size"] == 288
    assert resolve_preprocessing(timm_cfg, 64)["size"] == 64
    tv_cfg = {"resize_size": 256, "crop_size": 224, "interpolation": "bilinear"}  # the weights manifest's form
    assert resolve_preprocessing(tv_cfg)["size"] == 224 and resolve_preprocessing(tv_cfg)["crop_pct"] == 0.875
    gray = resolve_preprocessing(None, 16, in_chans=1)
    assert gray["mean"] == [pytest.approx(sum(IMAGENET_MEAN) / 3)]
    with pytest.raises(ValueError, match="interpolation"):
        resolve_preprocessing({"interpolation": "lanczos9"}, 8)


def test_eval_transform_matches_a_hand_written_reference(tmp_path):
    path = tmp_path / "x.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    pre = resolve_preprocessing({"crop_pct": 0.875, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}, 16)
    out = eval_transform(pre)(open_image(path))
    # torchvision's preset on a PIL image: PIL resizes the short side (30 -> floor(16 / 0.875) = 18,
    # 40 -> 24), then a centred 16x16 crop, scaling to [0, 1] and normalising.
    short = math.floor(16 / 0.875)
    resized = np.asarray(Image.open(path).convert("RGB").resize((int(40 * short / 30), short), Image.BILINEAR))
    ref = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()
    top, left = (short - 16) // 2, (ref.shape[-1] - 16) // 2
    ref = ref[:, top:top + 16, left:left + 16] / 255
    ref = (ref - torch.tensor(pre["mean"])[:, None, None]) / torch.tensor(pre["std"])[:, None, None]
    assert out.shape == (3, 16, 16) and type(out) is torch.Tensor
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_eval_transform_is_the_weights_preprocessing(tmp_path):
    # One pipeline: a run's eval transform at the registry's settings equals the weights' own transforms().
    path = tmp_path / "y.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(path)
    entry = dz.get_weights("densenet121")
    pre = resolve_preprocessing(entry.preprocessing, None, 3)
    img = open_image(path)
    torch.testing.assert_close(eval_transform(pre)(img), entry.transforms()(img), atol=0, rtol=0)


def test_augmentation_is_seeded_per_sample_and_leaves_the_global_rng_alone(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(4):  # textured images, so that different crops give different tensors
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "d" / c / f"{i}.png")
    samples = load_splits(tmp_path / "d", val_split=0.25).train
    pre = resolve_preprocessing(None, 8)
    ds = ImageDataset(samples, train_transform(pre, "standard"), seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = [ds[i][0] for i in range(len(ds))]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another global state and another order: same tensors
    for i in reversed(range(len(ds))):
        assert torch.equal(ds[i][0], first[i])
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][0], first[i]) for i in range(len(ds)))
    with pytest.raises(ValueError, match="augment"):
        train_transform(pre, "heavy")


def _gradient(size: int = 16):
    """Values 0..1 across the image: the reference every mode below must reproduce as 8-bit gray."""
    import numpy as np

    return np.linspace(0.0, 1.0, size * size).reshape(size, size)


@pytest.mark.parametrize("mode", ["F-unit", "F-255", "F-signed", "I;16", "I-8bit", "I-16bit", "LAB", "CMYK", "YCbCr"])
def test_uncommon_image_modes_read_as_the_picture_they_hold(tmp_path, mode):
    """Float (0..1 as float TIFFs hold them, 0..255, or any range), 16/32-bit integer and other colour spaces
    (CIELAB and CMYK TIFFs, YCbCr JPEGs): each read gives the 8-bit picture, within a level, not black or clipped."""
    import numpy as np
    from PIL import Image

    from densenet_zoo.data.images import open_image

    g = _gradient()
    want = np.rint(g * 255)
    rgb = Image.fromarray(np.stack([want] * 3, -1).astype(np.uint8), "RGB")
    kind, _, detail = mode.partition("-")
    if kind == "F":
        scale, offset = {"unit": (1.0, 0.0), "255": (255.0, 0.0), "signed": (7.0, -3.0)}[detail]
        img, suffix = Image.fromarray((g * scale + offset).astype(np.float32), "F"), ".tif"
    elif kind == "I;16":
        img, suffix = Image.fromarray(np.rint(g * 65535).astype(np.uint16)), ".png"
    elif kind == "I":
        top = 255 if detail == "8bit" else 65535
        img, suffix = Image.fromarray(np.rint(g * top).astype(np.int32), "I"), ".tif"
    else:
        img, suffix = rgb.convert(kind), ".tif" if kind != "YCbCr" else ".jpg"
    path = tmp_path / f"img{suffix}"
    img.save(path, **({"quality": 100} if suffix == ".jpg" else {}))
    got = np.asarray(open_image(path, 3), dtype=np.float64)
    tolerance = 2.5 if kind in ("LAB", "YCbCr", "CMYK") else 1.0  # colour-space round trips round twice
    assert np.abs(got - want[..., None]).max() <= tolerance, (mode, Image.open(path).mode, got[..., 0].max())


def test_an_image_with_nan_pixels_is_unreadable_with_its_reason(tmp_path):
    import numpy as np
    from PIL import Image

    from densenet_zoo.data.images import UnreadableImageError, open_image

    a = _gradient().astype(np.float32)
    a[3, 3] = np.nan
    Image.fromarray(a, "F").save(tmp_path / "nan.tif")
    with pytest.raises(UnreadableImageError, match="nan.tif: unreadable image .*nan or inf pixel values"):
        open_image(tmp_path / "nan.tif")
