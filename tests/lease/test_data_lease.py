"""Datasets: digits, CIFAR-format pickles and ImageFolder trees built on the fly, loaders."""

import os
import pickle

import numpy as np
import pytest
import torch

from applications.lease.data import (
    DatasetFormatError,
    DatasetNotFoundError,
    digits_arrays,
    load_dataset,
    make_loader,
    stratified_split,
)


def _write_cifar(root, kind, per_batch=8, test=6, seed=0):
    """Tiny CIFAR python batches in the layout torchvision's download produces."""
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        folder, batches, label_key = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels"
        meta_name, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder, batches, label_key = "cifar-100-python", ["train"], "fine_labels"
        meta_name, meta = "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"k{i}" for i in range(20)]}
    path = os.path.join(root, folder)
    os.makedirs(path)
    for name, n in [(b, per_batch) for b in batches] + [("test_batch" if kind == "cifar10" else "test", test)]:
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), label_key: [int(v) for v in np.arange(n) % 2]}
        if kind == "cifar100":
            entry["coarse_labels"] = [0] * n
        with open(os.path.join(path, name), "wb") as fh:
            pickle.dump(entry, fh)
    with open(os.path.join(path, meta_name), "wb") as fh:
        pickle.dump(meta, fh)
    return path


def test_digits_split_is_stratified_deterministic_and_indexed():
    a = load_dataset("digits", seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (898, 449, 450)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, 8)
    x, y, i = a.train[5]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert i == 5 and a.test[449][2] == 449
    assert torch.bincount(a.val.labels, minlength=10).min() >= 40  # every class present in val
    b = load_dataset("digits", seed=0)
    assert torch.equal(a.train.images, b.train.images)
    c = load_dataset("digits", seed=1)
    assert not torch.equal(a.train.images, c.train.images)
    # train/val/test are disjoint: no image appears in two splits
    rows = lambda d: {tuple(r) for r in d.images.flatten(1).tolist()}
    assert not rows(a.train) & rows(a.test) and not rows(a.val) & rows(a.test)
    full = load_dataset("digits", seed=0, full_train=True)
    assert len(full.train) == 1347 and len(full.val) == 0 and torch.equal(full.test.images, a.test.images)


def test_digits_are_sklearns_bundled_digits():
    from sklearn.datasets import load_digits

    pixels, labels = digits_arrays()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.data) and np.array_equal(labels, bunch.target)


def test_stratified_split_fractions():
    labels = np.repeat(np.arange(4), 40)
    train, val = stratified_split(labels, [0.1, 0.025], seed=3)
    assert len(train) == 16 and len(val) == 4 and not set(train) & set(val)
    assert np.bincount(labels[val], minlength=4).tolist() == [1, 1, 1, 1]


def test_cifar10_pickles_load_with_split_and_augmentation(tmp_path):
    _write_cifar(str(tmp_path), "cifar10")
    s = load_dataset("cifar10", root=str(tmp_path), seed=0, cutout=16)
    assert (len(s.train), len(s.val), len(s.test)) == (20, 20, 6)
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 3, 32)
    x, y, i = s.train[3]
    assert x.shape == (3, 32, 32) and i == 3 and int(y) in (0, 1)
    xt, _, it = s.test[5]
    assert it == 5 and xt.shape == (3, 32, 32)
    # test images are normalized, not augmented: the same item twice is identical
    assert torch.equal(s.test[2][0], s.test[2][0])
    full = load_dataset("cifar10", root=str(tmp_path), full_train=True, augment=False)
    assert len(full.train) == 40 and len(full.val) == 0
    # pointing at the extracted folder itself works too
    assert len(load_dataset("cifar10", root=str(tmp_path / "cifar-10-batches-py")).test) == 6


def test_cifar100_pickles_load(tmp_path):
    _write_cifar(str(tmp_path), "cifar100", per_batch=12, test=4)
    s = load_dataset("cifar100", root=str(tmp_path))
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (6, 6, 4, 100)


def test_missing_and_malformed_cifar_fail_fast(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="needs a data root"):
        load_dataset("cifar10")
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", root=str(tmp_path))
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and "download" in str(err.value)
    path = _write_cifar(str(tmp_path), "cifar10")
    with open(os.path.join(path, "data_batch_3"), "wb") as fh:
        fh.write(b"not a pickle")
    with pytest.raises(DatasetFormatError, match="data_batch_3"):
        load_dataset("cifar10", root=str(tmp_path))
    os.remove(os.path.join(path, "data_batch_3"))
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", root=str(tmp_path))


def _write_image_folder(root, classes=2, per_class=20, val_per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)).save(os.path.join(folder, f"{k}.png"))


def test_imagenet_folder_search_subsets(tmp_path):
    _write_image_folder(str(tmp_path))
    s = load_dataset("imagenet", root=str(tmp_path), seed=0, image_size=8)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (4, 2, 6, 2)  # 10% / 2.5% (at least 1) per class
    x, y, i = s.train[3]
    assert x.shape == (3, 8, 8) and i == 3
    assert s.test[5][2] == 5
    other = load_dataset("imagenet", root=str(tmp_path), seed=1, image_size=8)
    assert not np.array_equal(s.train.indices, other.train.indices)
    assert len(load_dataset("imagenet", root=str(tmp_path), full_train=True, image_size=8).train) == 40


def test_imagenet_missing_root(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("imagenet", root=str(tmp_path))
    assert os.path.join(str(tmp_path), "train") in str(err.value) and "image-net.org" in str(err.value)


def test_make_loader_is_seeded():
    s = load_dataset("digits", seed=0)
    first = [i.tolist() for _, _, i in make_loader(s.val, 64, shuffle=True, seed=7)]
    again = [i.tolist() for _, _, i in make_loader(s.val, 64, shuffle=True, seed=7)]
    other = [i.tolist() for _, _, i in make_loader(s.val, 64, shuffle=True, seed=8)]
    assert first == again and first != other
    assert all(len(b) == 64 for b in first) and len(first) == 449 // 64


def test_synthetic_task_is_split_like_the_digits_and_correlated_only_at_its_lag():
    """The known-answer task: 4 stratified classes split 50/25/25 (train + val merged with full_train), and
    each class's pixels correlated +-CORRELATION at distance LAG along its direction, at no other distance."""
    from applications.lease import synthetic

    splits = load_dataset("synthetic", seed=0, full_train=False)
    n = synthetic.PER_CLASS * len(synthetic.CLASSES)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (n // 2, n // 4 + 2, n // 4 - 2)
    assert splits.num_classes == 4 and splits.in_channels == 1
    merged = load_dataset("synthetic", seed=0, full_train=True)
    assert len(merged.train) == len(splits.train) + len(splits.val) and len(merged.val) == 0
    x, y = synthetic.synthetic_arrays(per_class=3000, seed=1)
    assert x.shape == (12000, 1, 8, 8) and np.bincount(y).tolist() == [3000] * 4
    for label, (axis, sign) in enumerate(((2, 1), (2, -1), (1, 1), (1, -1))):   # rows: along the last axis
        img = x[y == label, 0]
        for lag in range(1, 8):
            a = np.take(img, range(0, 8 - lag), axis=axis).ravel()
            b = np.take(img, range(lag, 8), axis=axis).ravel()
            want = sign * synthetic.CORRELATION if lag == synthetic.LAG else 0.0
            assert np.corrcoef(a, b)[0, 1] == pytest.approx(want, abs=0.02), (label, lag)
