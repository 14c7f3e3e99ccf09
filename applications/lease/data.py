"""Datasets for LeaSE: digits (embedded), CIFAR-10/100 and ImageNet, with per-example indices.

Every split yields ``(x, y, index)`` where ``index`` is the example's position in
*its split* (0 .. len(split) - 1), so a per-example explanation bank can be a
plain tensor indexed by it.

Splits (all seeded, all stratified by class):

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, no download),
  scaled to [0, 1], shape (1, 8, 8); 50% train / 25% val / 25% test.
- ``cifar10`` / ``cifar100``: the 50k training images split 50/50 into train and
  val (25k / 25k, as in the LeaSE paper); the official 10k test set.
- ``imagenet``: an ImageFolder root with ``train/`` and ``val/``; train and val
  are per-class 10% / 2.5% subsets of ``train/`` (the PC-DARTS / LeaSE search
  setting); test is ``val/``.

``full_train=True`` is the evaluation setting: train is the whole training data
(train + val above; all of ``train/`` for ImageNet) and val is empty.
A missing or malformed root raises :class:`DatasetNotFoundError` /
:class:`DatasetFormatError` naming the expected path and how to get the data.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from applications.digits import arrays as digits_arrays
from applications.digits import stratified_split

from . import synthetic

__all__ = [
    "DATASETS",
    "DataSplits",
    "DatasetNotFoundError",
    "DatasetFormatError",
    "IndexedTensorDataset",
    "IndexedSubset",
    "load_dataset",
    "make_loader",
    "stratified_split",
    "read_cifar",
    "digits_arrays",
]

DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagenet")   # synthetic: see synthetic.py
FOLDER_DATASETS = ("cifar10", "cifar100", "imagenet")   # read from a data folder (data.root)

CIFAR_STATS = {
    "cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_CIFAR_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "names": "label_names",
        "labels": "labels",
        "classes": 10,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "names": "fine_label_names",
        "labels": "fine_labels",
        "classes": 100,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}


class DatasetNotFoundError(FileNotFoundError):
    """The data root (or a file in it) is missing; the message says what was expected and how to get it."""


class DatasetFormatError(ValueError):
    """A data file exists but is not in the expected format."""


@dataclass
class DataSplits:
    """The three splits of a dataset, each yielding ``(x, y, index)``, plus its shape facts."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


# --------------------------------------------------------------------------- datasets


class IndexedTensorDataset(Dataset):
    """Images held in memory; item ``i`` is ``(transform(images[i]), labels[i], i)``.

    ``images`` is float ``(N, C, H, W)`` or uint8 ``(N, H, W, C)`` (converted to
    float in [0, 1] per item).
    """

    def __init__(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, transform: Callable | None = None):
        self.images = torch.as_tensor(images)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if x.dtype == torch.uint8:
            x = x.permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i], i


class IndexedSubset(Dataset):
    """Positions ``indices`` of a ``base`` dataset yielding ``(x, y)``; item ``i`` is ``(x, y, i)``."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable | None = None):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.base[int(self.indices[i])][:2]
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.as_tensor(y, dtype=torch.long), i


# --------------------------------------------------------------------------- transforms (on CHW float tensors)


class Cutout:
    """Zero a ``size`` x ``size`` square at a random centre (clipped at the border), DeVries & Taylor 2017."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        cy = int(torch.randint(h, (1,)))
        cx = int(torch.randint(w, (1,)))
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size // 2)
        x = x.clone()
        x[..., y0:y1, x0:x1] = 0.0
        return x


class CropFlip:
    """Random crop from a zero-padded image (``padding`` pixels) and a random horizontal flip."""

    def __init__(self, padding: int = 4, flip: bool = True):
        self.padding = padding
        self.flip = flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.padding
        if p > 0:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = int(torch.randint(2 * p + 1, (1,)))
            dx = int(torch.randint(2 * p + 1, (1,)))
            x = padded[..., dy : dy + h, dx : dx + w]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x


class Normalize:
    """Per-channel ``(x - mean) / std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = [t for t in transforms if t is not None]

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


# --------------------------------------------------------------------------- splitting


def _subsample(indices: np.ndarray, labels: np.ndarray, fraction: float | None, seed: int) -> np.ndarray:
    if fraction is None or fraction >= 1.0 or len(indices) == 0:
        return indices
    (kept,) = stratified_split(labels[indices], [fraction], seed)
    return indices[kept]


# --------------------------------------------------------------------------- digits


def _load_digits(seed: int, full_train: bool, subset_fraction: float | None, cutout: int) -> DataSplits:
    pixels, labels = digits_arrays()
    images = torch.tensor(pixels, dtype=torch.float32).div_(16.0).view(-1, 1, 8, 8)  # in [0, 1]
    return small_splits(images, labels, 10, seed, full_train, subset_fraction, cutout)


def _load_synthetic(seed: int, full_train: bool, subset_fraction: float | None, cutout: int) -> DataSplits:
    """The known-answer task (:mod:`.synthetic`) in the digits' layout (``full_train`` merges train + val)."""
    images, labels = synthetic.synthetic_arrays()
    return small_splits(torch.from_numpy(images), labels, len(synthetic.CLASSES), seed, full_train, subset_fraction,
                        cutout)


def small_splits(images: torch.Tensor, labels: np.ndarray, num_classes: int, seed: int, full_train: bool,
                 subset_fraction: float | None, cutout: int) -> DataSplits:
    """An in-memory image set as train / val / test (50/25/25 %, stratified); ``full_train`` merges
    train and val; ``subset_fraction`` subsamples train and val (never test); cutout on train only."""
    train_idx, val_idx, test_idx = stratified_split(labels, [0.5, 0.25, 0.25], seed)
    if full_train:
        train_idx, val_idx = np.sort(np.concatenate([train_idx, val_idx])), val_idx[:0]
    train_idx = _subsample(train_idx, labels, subset_fraction, seed + 1)
    val_idx = _subsample(val_idx, labels, subset_fraction, seed + 2)
    train_tf = Cutout(cutout) if cutout > 0 else None

    def part(idx: np.ndarray, tf: Callable | None) -> IndexedTensorDataset:
        return IndexedTensorDataset(images[idx], labels[idx], tf)

    return DataSplits(part(train_idx, train_tf), part(val_idx, None), part(test_idx, None), num_classes,
                      images.shape[1], images.shape[-1])


# --------------------------------------------------------------------------- CIFAR


def _how_to_get_cifar(name: str, root: str | None) -> str:
    layout = _CIFAR_LAYOUT[name]
    where = root if root is not None else "DIR"
    return (
        f"download {layout['url']} and extract it into {where} so that "
        f"{os.path.join(where, layout['folder'], layout['train'][0])} exists, "
        "or pass download=True (--set data.download=true) to fetch it"
    )


def _cifar_folder(name: str, root: str | None) -> str:
    layout = _CIFAR_LAYOUT[name]
    if root is None:
        raise DatasetNotFoundError(f"{name} needs a data root (--set data.root=DIR); {_how_to_get_cifar(name, None)}")
    if os.path.basename(os.path.normpath(root)) == layout["folder"]:
        return root  # the user pointed at the extracted folder itself
    return os.path.join(root, layout["folder"])


def _unpickle(path: str, name: str, root: str | None) -> dict:
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"{name}: expected file {path} is missing; {_how_to_get_cifar(name, root)}")
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except Exception as exc:
        raise DatasetFormatError(f"{name}: cannot read {path} ({type(exc).__name__}: {exc}); {_how_to_get_cifar(name, root)}") from None
    if not isinstance(entry, dict):
        raise DatasetFormatError(f"{name}: {path} does not hold a CIFAR batch dict; {_how_to_get_cifar(name, root)}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def read_cifar(name: str, root: str | None, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR python batches: ``(images uint8 (N, 32, 32, 3), labels int64 (N,))``.

    Reads the files itself (rather than through torchvision's dataset classes) so
    that a damaged file gets an error naming it, and so that small files in the
    same format (tests, subsets) load too.
    """
    layout = _CIFAR_LAYOUT[name]
    folder = _cifar_folder(name, root)
    if not os.path.isdir(folder):
        raise DatasetNotFoundError(f"{name}: expected folder {folder} does not exist; {_how_to_get_cifar(name, root)}")
    meta = _unpickle(os.path.join(folder, layout["meta"]), name, root)
    if len(meta.get(layout["names"], ())) != layout["classes"]:
        raise DatasetFormatError(
            f"{name}: {os.path.join(folder, layout['meta'])} should list {layout['classes']} class names under "
            f"'{layout['names']}'; {_how_to_get_cifar(name, root)}"
        )
    images, labels = [], []
    for fname in layout["train" if train else "test"]:
        path = os.path.join(folder, fname)
        entry = _unpickle(path, name, root)
        if "data" not in entry or layout["labels"] not in entry:
            raise DatasetFormatError(f"{name}: {path} lacks 'data' or '{layout['labels']}'; {_how_to_get_cifar(name, root)}")
        data = np.asarray(entry["data"], dtype=np.uint8)
        lab = np.asarray(entry[layout["labels"]], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(lab):
            raise DatasetFormatError(
                f"{name}: {path} holds data of shape {data.shape} with {len(lab)} labels, "
                f"expected (N, 3072) and N labels; {_how_to_get_cifar(name, root)}"
            )
        if len(lab) and (lab.min() < 0 or lab.max() >= layout["classes"]):
            raise DatasetFormatError(f"{name}: {path} has labels outside 0..{layout['classes'] - 1}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _download_cifar(name: str, root: str) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    os.makedirs(root, exist_ok=True)
    cls(root, train=True, download=True)


def _load_cifar(name: str, root: str | None, seed: int, download: bool, augment: bool, cutout: int,
                full_train: bool, subset_fraction: float | None, train_portion: float) -> DataSplits:
    if download:
        if root is None:
            raise DatasetNotFoundError(f"{name}: download=True needs a root folder to download into (--set data.root=DIR)")
        _download_cifar(name, root)
    train_x, train_y = read_cifar(name, root, train=True)
    test_x, test_y = read_cifar(name, root, train=False)
    mean, std = CIFAR_STATS[name]
    norm = Normalize(mean, std)
    train_tf = Compose([CropFlip(4) if augment else None, norm, Cutout(cutout) if cutout > 0 else None])
    if full_train:
        train_idx, val_idx = np.arange(len(train_y)), np.zeros(0, dtype=np.int64)
    else:
        train_idx, val_idx = stratified_split(train_y, [train_portion, 1.0 - train_portion], seed)
    train_idx = _subsample(train_idx, train_y, subset_fraction, seed + 1)
    val_idx = _subsample(val_idx, train_y, subset_fraction, seed + 2)
    return DataSplits(
        train=IndexedTensorDataset(train_x[train_idx], train_y[train_idx], train_tf),
        val=IndexedTensorDataset(train_x[val_idx], train_y[val_idx], norm),
        test=IndexedTensorDataset(test_x, test_y, norm),
        num_classes=_CIFAR_LAYOUT[name]["classes"],
        in_channels=3,
        image_size=32,
    )


# --------------------------------------------------------------------------- ImageNet


_IMAGENET_HOW = (
    "ImageNet (ILSVRC2012) must be obtained from https://image-net.org (registration required) and laid out "
    "as ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG (validation images sorted into class folders)"
)


def _image_folder(path: str):
    import torchvision

    if not os.path.isdir(path):
        raise DatasetNotFoundError(f"imagenet: expected folder {path} does not exist; {_IMAGENET_HOW}")
    try:
        return torchvision.datasets.ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetFormatError(f"imagenet: {path} is not a class-per-folder image tree ({exc}); {_IMAGENET_HOW}") from None


def _imagenet_transforms(image_size: int, augment: bool, cutout: int):
    from torchvision import transforms as T

    mean, std = IMAGENET_STATS
    to_tensor = [T.ToTensor(), T.Normalize(mean, std)]
    if augment:
        train = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                 T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)]
    else:
        train = [T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size)]
    train_tf = T.Compose(train + to_tensor + ([Cutout(cutout)] if cutout > 0 else []))
    test_tf = T.Compose([T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size)] + to_tensor)
    return train_tf, test_tf


def _load_imagenet(root: str | None, seed: int, augment: bool, cutout: int, full_train: bool,
                   subset_fraction: float | None, image_size: int, fractions: tuple[float, float]) -> DataSplits:
    if root is None:
        raise DatasetNotFoundError(f"imagenet needs a data root (--set data.root=DIR); {_IMAGENET_HOW}")
    train_folder = _image_folder(os.path.join(root, "train"))
    test_folder = _image_folder(os.path.join(root, "val"))
    if train_folder.classes != test_folder.classes:
        raise DatasetFormatError(
            f"imagenet: {os.path.join(root, 'train')} and {os.path.join(root, 'val')} have different class folders; {_IMAGENET_HOW}"
        )
    targets = np.asarray(train_folder.targets, dtype=np.int64)
    if full_train:
        train_idx, val_idx = np.arange(len(targets)), np.zeros(0, dtype=np.int64)
    else:
        train_idx, val_idx = stratified_split(targets, list(fractions), seed)
    train_idx = _subsample(train_idx, targets, subset_fraction, seed + 1)
    val_idx = _subsample(val_idx, targets, subset_fraction, seed + 2)
    train_tf, test_tf = _imagenet_transforms(image_size, augment, cutout)
    return DataSplits(
        train=IndexedSubset(train_folder, train_idx, train_tf),
        val=IndexedSubset(train_folder, val_idx, test_tf),
        test=IndexedSubset(test_folder, np.arange(len(test_folder)), test_tf),
        num_classes=len(train_folder.classes),
        in_channels=3,
        image_size=image_size,
    )


# --------------------------------------------------------------------------- entry points


def load_dataset(
    name: str,
    root: str | None = None,
    seed: int = 0,
    download: bool = False,
    augment: bool = True,
    cutout: int = 0,
    subset_fraction: float | None = None,
    *,
    full_train: bool = False,
    train_portion: float = 0.5,
    image_size: int | None = None,
    imagenet_fractions: tuple[float, float] = (0.1, 0.025),
) -> DataSplits:
    """Load ``name`` (``digits``, ``cifar10``, ``cifar100``, ``imagenet``) as :class:`DataSplits`.

    Args:
        root: data folder (unused for digits). CIFAR: the folder holding
            ``cifar-10-batches-py/`` or ``cifar-100-python/``; ImageNet: the folder
            holding ``train/`` and ``val/``.
        seed: fixes the split (and subsampling).
        download: fetch CIFAR into ``root`` if missing (ImageNet cannot be downloaded).
        augment: random crop + flip for CIFAR training images, random resized crop,
            flip and colour jitter for ImageNet; digits are never augmented (8x8 glyphs
            are too small for crops and flips).
        cutout: side of the cutout square for training images (0: off; 16 for CIFAR evaluation).
        subset_fraction: keep only this per-class fraction of train and val (quick runs).
        full_train: evaluation setting; train on all training data, empty val.
        train_portion: CIFAR fraction of the 50k training images used as train (rest: val).
        image_size: ImageNet crop size (default 224).
        imagenet_fractions: per-class fractions of ``train/`` forming the search train and val.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if cutout < 0:
        raise ValueError(f"cutout must be >= 0, got {cutout}")
    if subset_fraction is not None and not 0.0 < subset_fraction <= 1.0:
        raise ValueError(f"subset_fraction must be in (0, 1], got {subset_fraction}")
    root = os.fspath(root) if root is not None else None
    if key == "digits":
        return _load_digits(seed, full_train, subset_fraction, cutout)
    if key == "synthetic":
        return _load_synthetic(seed, full_train, subset_fraction, cutout)
    if key in ("cifar10", "cifar100"):
        if not 0.0 < train_portion < 1.0:
            raise ValueError(f"train_portion must be in (0, 1), got {train_portion}")
        return _load_cifar(key, root, seed, download, augment, cutout, full_train, subset_fraction, train_portion)
    if download:
        raise DatasetNotFoundError(f"imagenet cannot be downloaded automatically; {_IMAGENET_HOW}")
    return _load_imagenet(root, seed, augment, cutout, full_train, subset_fraction, image_size or 224, imagenet_fractions)


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker a distinct numpy seed derived from torch's per-worker seed."""
    np.random.seed(torch.initial_seed() % 2**32)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool = True,
                num_workers: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A ``DataLoader`` whose shuffling is fixed by ``seed``.

    ``drop_last`` is ignored when the dataset (or this process's shard) is smaller
    than one batch, so a tiny split still yields a batch.

    With ``world_size > 1`` (data parallelism) the loader yields process ``rank``'s
    shard (:class:`mlo.distributed.ShardedSampler`): every process draws the same
    seeded permutation per epoch and keeps every ``world_size``-th example of it,
    so the shards are disjoint and ``batch_size`` is the per-process batch.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler, per_process = None, len(dataset)
    if world_size > 1:
        from mlo.distributed import ShardedSampler

        sampler = ShardedSampler(len(dataset), rank=rank, world_size=world_size, shuffle=shuffle, generator=generator)
        per_process = len(sampler)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        drop_last=drop_last and per_process >= batch_size,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
