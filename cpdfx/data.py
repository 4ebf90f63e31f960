"""Datasets for distillation: Fashion-MNIST (the Debian IDX files), sklearn's
digits, image folders, segmentation folders and a segmentation set composed of
Fashion-MNIST items. Nothing is downloaded and torchvision is not needed.

Every dataset returns `(image, target)`: a float image (C, H, W) in [0, 1] (or
normalised) and a long class label, or a long (H, W) mask for segmentation.
With `augment=True` the random flip and crop are drawn from a generator seeded
by (seed, epoch, index), not the global RNG: the same sample gets the same
augmentation whatever the worker, rank or order that loads it, which is what
lets a resumed or distributed run see exactly the data of a single one.
`set_epoch(epoch)` (the training loop calls it) moves to the next epoch's draws.

Every dataset has the splits "train", "val" and "test". "val" is a share of the
training split drawn with a fixed seed (VAL_SEED: the same images in every run,
whatever the run's seed), and "train" is then the rest of it; a folder with a
val/ sub-folder has its own instead (see resolve_data).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_ENV = "CPDFX_FASHION_MNIST"
FASHION_STATS = ((0.2860,), (0.3530,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IGNORE_INDEX = 255


class DataError(RuntimeError):
    """A dataset cannot be found or read."""


VAL_SHARE = 0.1  # the share of the training split resolve_data holds out as "val"
VAL_SEED = 0  # which images those are: fixed, so every run holds out the same ones


# -- augmentation -----------------------------------------------------------------------


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator private to one sample of one epoch (see the module docstring)."""
    key = hash((int(seed), int(epoch), int(index)))  # ints hash the same in every process
    return torch.Generator().manual_seed(key & 0x7FFF_FFFF_FFFF_FFFF)


def random_crop(image: torch.Tensor, pad: int, generator: torch.Generator, mask=None,
                ignore_index: int = IGNORE_INDEX):
    """Pad by `pad` on every side (zeros; `ignore_index` for the mask) and crop
    back to the original size at a random offset; the mask gets the same crop."""
    if pad <= 0:
        return image, mask
    h, w = image.shape[-2:]
    top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    image = F.pad(image, (pad, pad, pad, pad))[..., top:top + h, left:left + w]
    if mask is not None:
        mask = F.pad(mask, (pad, pad, pad, pad), value=ignore_index)[..., top:top + h, left:left + w]
    return image, mask


def random_flip(image: torch.Tensor, generator: torch.Generator, mask=None):
    """Mirror left-right with probability 1/2; the mask follows the image."""
    if torch.rand((), generator=generator) < 0.5:
        image = image.flip(-1)
        mask = None if mask is None else mask.flip(-1)
    return image, mask


class Augmented(Dataset):
    """Shared by every dataset here: per-sample augmentation (flip, then a crop
    padded by 1/8 of the side), the epoch it depends on, and normalisation.
    normalize: False (images in [0, 1]), True (the dataset's own mean and std)
    or a (mean, std) pair of per-channel tuples."""

    ignore_index = IGNORE_INDEX  # what a mask is padded with: a padded border has no label

    def __init__(self, *, augment: bool, normalize, default_stats, seed: int, flip: bool = True):
        self.augment, self.seed, self.flip, self.epoch = augment, seed, flip, 0
        if normalize is True and default_stats is None:
            raise DataError("normalize=True needs the dataset's mean and std; pass normalize=(mean, std)")
        stats = default_stats if normalize is True else normalize or None
        self.mean, self.std = (None, None) if stats is None else (
            torch.tensor(stats[0]).view(-1, 1, 1), torch.tensor(stats[1]).view(-1, 1, 1))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def finish(self, index: int, image: torch.Tensor, mask=None):
        """Augment (when asked) and normalise one sample."""
        if self.augment:
            g = sample_generator(self.seed, self.epoch, index)
            if self.flip:
                image, mask = random_flip(image, g, mask)
            image, mask = random_crop(image, max(1, image.shape[-1] // 8), g, mask, self.ignore_index)
        if self.mean is not None:
            image = (image - self.mean) / self.std
        return image, mask


def to_float(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255 if image.dtype == torch.uint8 else image.float()


class ImageSet(Augmented):
    """Classification images held in memory: (N, C, H, W) uint8 or float in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes=None, *, augment=False,
                 normalize=False, default_stats=None, seed=0, flip=True):
        super().__init__(augment=augment, normalize=normalize, default_stats=default_stats, seed=seed,
                         flip=flip)
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels: every image needs one label")
        self.images, self.labels = images, labels.long()
        self.classes = tuple(classes) if classes is not None else tuple(
            str(c) for c in range(int(self.labels.max()) + 1))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image, _ = self.finish(index, to_float(self.images[index]))
        return image, self.labels[index]


# -- Fashion-MNIST ----------------------------------------------------------------------


def read_idx(path) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped or not) as a uint8 array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; a cut .gz ends in EOFError
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}; the file is corrupt") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes: it should start with the magic "
                        f"bytes 00 00 08 followed by the number of dims")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} ends inside its header ({ndim} dims declared): the file is truncated")
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} declares shape {shape} ({int(np.prod(shape))} bytes) but holds "
                        f"{body.size} bytes: the file is truncated or corrupt")
    return body.reshape(shape)


def fashion_root(root=None) -> Path:
    return Path(root or os.environ.get(FASHION_ENV) or FASHION_ROOT)


def _idx_path(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST not found: {root} has no {name}.gz. On Debian or Ubuntu install it with "
        f"`apt-get install dataset-fashion-mnist` (the files go to {FASHION_ROOT}); otherwise put the "
        f"four IDX files (train/t10k images and labels, from github.com/zalandoresearch/fashion-mnist) "
        f"in a folder and set {FASHION_ENV}=/that/folder or pass root=. cpdfx never downloads data.")


def fashion_arrays(split: str, root=None) -> tuple[np.ndarray, np.ndarray]:
    """The raw (N, 28, 28) uint8 images and (N,) labels of one split (read once per folder)."""
    if split not in ("train", "test"):
        raise DataError(f"Fashion-MNIST has the splits 'train' and 't10k' (called 'test' here), not {split!r}")
    return _read_fashion(split, str(fashion_root(root)))


@functools.lru_cache(maxsize=4)
def _read_fashion(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    base, prefix = Path(root), "train" if split == "train" else "t10k"
    images = read_idx(_idx_path(base, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_path(base, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST in {base}: images of shape {images.shape} do not pair with "
                        f"labels of shape {labels.shape}; expected (N, 28, 28) and (N,)")
    return images, labels


def fashion_mnist(split: str = "train", root=None, *, augment=False, normalize=False, seed=0) -> ImageSet:
    """Fashion-MNIST from its IDX files: 60000 train / 10000 test images, (1, 28, 28).

    root defaults to $CPDFX_FASHION_MNIST, else /usr/share/datasets/fashion-mnist
    (Debian's dataset-fashion-mnist); a missing file raises DataError saying how to
    get it. normalize=True uses the training set's mean and std."""
    images, labels = fashion_arrays(split, root)
    return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                    FASHION_CLASSES, augment=augment, normalize=normalize, default_stats=FASHION_STATS,
                    seed=seed)


# -- digits -----------------------------------------------------------------------------


DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(images, bunch.target, test_size=0.25, random_state=DIGITS_SPLIT_SEED,
                            stratify=bunch.target)


def digits(split: str = "train", *, augment=False, normalize=False, seed=0) -> ImageSet:
    """sklearn's 8x8 digits (1797 images, 10 classes) as (1, 8, 8) images in [0, 1],
    split 1347 train / 450 test, stratified, always the same split: a real image
    set small enough for tests that train in seconds. Flips are off (a mirrored
    2 is not a 2)."""
    if split not in ("train", "test"):
        raise DataError(f"digits has the splits 'train' and 'test', not {split!r}")
    x_train, x_test, y_train, y_test = _digits_split()
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    stats = ((float(x_train.mean()),), (float(x_train.std()),))
    return ImageSet(torch.from_numpy(x), torch.from_numpy(y), [str(d) for d in range(10)],
                    augment=augment, normalize=normalize, default_stats=stats, seed=seed, flip=False)


# -- folders ----------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


@contextlib.contextmanager
def open_image(path: Path):
    """Pillow's image at path; a file it cannot decode (corrupt, truncated, not an
    image) is a DataError that names the file, wherever in the work it is read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            yield img
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's decoders raise these for bad files
        raise DataError(f"cannot read the image {path}: {type(err).__name__}: {err}. Replace or remove "
                        f"the file and run again.") from None


def load_image(path: Path, mode: str, size=None) -> torch.Tensor:
    """An image file as a float (C, H, W) tensor in [0, 1], resized bilinearly to size (h, w)."""
    from PIL import Image

    with open_image(path) as img:
        img = img.convert(mode)
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def load_mask(path: Path, size=None) -> torch.Tensor:
    """A class-index PNG (grayscale or palette: the pixel value is the class) as a
    long (H, W) tensor, resized with nearest neighbour so no class is invented."""
    from PIL import Image

    with open_image(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"mask {path} has mode {img.mode}: masks must be class-index images "
                            f"(grayscale 'L' or palette 'P' PNGs whose pixel values are class ids), "
                            f"not colour images")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.NEAREST)
        return torch.from_numpy(np.asarray(img).astype(np.int64))


def _folder(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    return root


class ImageFolder(Augmented):
    """Classification images in `root/<class name>/<image>`, one folder per class
    (sorted names give the label ids), read with Pillow and resized to image_size
    (int or (h, w)). normalize=True uses the ImageNet mean and std (RGB)."""

    def __init__(self, root, image_size, *, mode="RGB", augment=False, normalize=False, seed=0):
        super().__init__(augment=augment, normalize=normalize, seed=seed,
                         default_stats=IMAGENET_STATS if mode == "RGB" else ((0.5,), (0.5,)))
        root = _folder(root)
        self.root, self.mode, self.size = root, mode, _size(image_size)
        self.classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
        self.samples = [(path, label) for label, name in enumerate(self.classes)
                        for path in _image_files(root / name)]
        if not self.samples:
            raise DataError(f"no images in {root}: an image folder holds one sub-folder per class "
                            f"(root/<class>/<image>.png|.jpg|...); found {len(self.classes)} sub-folders "
                            f"and no image files in them")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image, _ = self.finish(index, load_image(path, self.mode, self.size))
        return image, torch.tensor(label)


class SegmentationFolder(Augmented):
    """Segmentation pairs `root/images/<stem>.<ext>` and `root/masks/<stem>.png`
    (class-index masks; ignore_index marks pixels without a label). Images are
    resized bilinearly, masks with nearest neighbour, to image_size when given."""

    def __init__(self, root, image_size=None, *, mode="RGB", augment=False, normalize=False,
                 ignore_index=IGNORE_INDEX, seed=0):
        super().__init__(augment=augment, normalize=normalize, seed=seed,
                         default_stats=IMAGENET_STATS if mode == "RGB" else ((0.5,), (0.5,)))
        root = _folder(root)
        images, masks = root / "images", root / "masks"
        if not images.is_dir() or not masks.is_dir():
            raise DataError(f"{root} is not a segmentation folder: it needs two sub-folders, images/ "
                            f"and masks/, with one class-index PNG in masks/ per image in images/ "
                            f"under the same file stem")
        image_files = {p.stem: p for p in _image_files(images)}
        mask_files = {p.stem: p for p in _image_files(masks)}
        unmatched = sorted(set(image_files) ^ set(mask_files))
        if unmatched:
            raise DataError(f"{len(unmatched)} file stem(s) in {root} have an image or a mask but not "
                            f"both (e.g. {', '.join(unmatched[:3])}): every images/<stem>.* needs a "
                            f"masks/<stem>.png")
        if not image_files:
            raise DataError(f"no images in {images}: put the images in images/ and their class-index "
                            f"masks, with the same file stems, in masks/")
        self.mode, self.size, self.ignore_index = mode, _size(image_size), ignore_index
        self.samples = [(image_files[s], mask_files[s]) for s in sorted(image_files)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image_path, mask_path = self.samples[index]
        image = load_image(image_path, self.mode, self.size)
        mask = load_mask(mask_path, self.size or tuple(image.shape[-2:]))
        return self.finish(index, image, mask)


# -- Fashion-MNIST segmentation ---------------------------------------------------------


class FashionSegmentation(Augmented):
    """Semantic segmentation from real Fashion-MNIST items: each sample pastes
    `items` images of the split at random places on a black canvas x canvas image.
    A pixel is labelled with its item's class + 1 (1..10) where that item's
    intensity is above `threshold` (and the item is painted there, later items on
    top), background 0 elsewhere, so the mask is exactly what the image shows.
    Sample i is drawn from a generator seeded by (seed, i): deterministic, built
    on the fly, nothing stored. The items come from `sources` (indices into the
    split's images; all of them by default), and `length` defaults to one item
    use per source. split_off carves the sources, not the canvases, so no
    held-out canvas shows an item a training canvas shows."""

    classes = ("background",) + FASHION_CLASSES

    def __init__(self, split: str = "train", *, canvas: int = 64, items: int = 3, length=None,
                 threshold: float = 0.1, root=None, augment=False, normalize=False, seed=0, sources=None):
        super().__init__(augment=augment, normalize=normalize, default_stats=FASHION_STATS, seed=seed)
        self.images, self.labels = fashion_arrays(split, root)
        side = self.images.shape[-1]
        if canvas < side or items < 1:
            raise DataError(f"FashionSegmentation needs canvas >= {side} (the item size) and items >= 1; "
                            f"got canvas={canvas}, items={items}")
        self.canvas, self.items, self.threshold = canvas, items, threshold
        self.sources = torch.arange(len(self.images)) if sources is None else torch.as_tensor(sources)
        self.length = len(self.sources) // items if length is None else length

    def __len__(self):
        return self.length

    def placements(self, index: int) -> list[tuple[int, int, int, int]]:
        """(source index, class id 0..9, top, left) of each item of sample `index`, in paint order."""
        g = sample_generator(self.seed, -1, index)  # epoch -1: never an augmentation stream
        side = self.images.shape[-1]
        sources = self.sources[torch.randint(0, len(self.sources), (self.items,), generator=g)].tolist()
        corners = torch.randint(0, self.canvas - side + 1, (self.items, 2), generator=g).tolist()
        return [(s, int(self.labels[s]), top, left) for s, (top, left) in zip(sources, corners)]

    def compose(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `index` before augmentation: a (1, canvas, canvas) image and its mask."""
        image = np.zeros((self.canvas, self.canvas), np.uint8)
        mask = np.zeros((self.canvas, self.canvas), np.int64)
        side = self.images.shape[-1]
        for source, label, top, left in self.placements(index):
            item = self.images[source]
            fg = item > self.threshold * 255
            image[top:top + side, left:left + side][fg] = item[fg]
            mask[top:top + side, left:left + side][fg] = label + 1
        return torch.from_numpy(image).unsqueeze(0).float() / 255, torch.from_numpy(mask)

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        return self.finish(index, *self.compose(index))

    def split_off(self, share: float, seed: int = VAL_SEED) -> tuple[FashionSegmentation, FashionSegmentation]:
        """(train, val) drawing from disjoint item sources, val from `share` of
        them; each keeps this set's canvases per source."""
        keep, held = cut(len(self.sources), share, seed)
        return self.drawing_from(self.sources[keep]), self.drawing_from(self.sources[held])

    def drawing_from(self, sources: torch.Tensor) -> FashionSegmentation:
        part = copy.copy(self)
        part.sources = sources
        part.length = max(1, round(self.length * len(sources) / len(self.sources)))
        return part


# -- by name ----------------------------------------------------------------------------


DATASETS = {"fashion-mnist": "classification", "digits": "classification", "fashion-seg": "segmentation"}
SPLITS = ("train", "val", "test")


def resolve_data(name_or_path, task: str = "classification", split: str = "train", *, augment=None,
                 normalize=False, image_size=224, root=None, seed=0, val_share=VAL_SHARE) -> Dataset:
    """The dataset a name or a folder stands for: "fashion-mnist", "digits",
    "fashion-seg" (FashionSegmentation), or a folder (an ImageFolder for
    classification; for segmentation a SegmentationFolder), and one of its
    splits: "train", "val" or "test". A folder's split is its `split`
    sub-folder when there is one. "val" is the val/ sub-folder of a folder that
    has one; otherwise `val_share` of the training split, drawn with VAL_SEED
    (see split_off), and "train" is the rest of it. val_share=0 holds nothing
    out: "train" is the whole training split and there is no "val".
    fashion-seg's val canvases show items its train canvases never show (the
    items are split, see FashionSegmentation.split_off). augment defaults to split == "train";
    image_size applies to folders, root to the Fashion-MNIST sets."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(map(repr, SPLITS))}, not {split!r}")
    if not 0 <= val_share < 1:
        raise DataError(f"val_share={val_share} is not a share of the training split: give a number in [0, 1)")
    options = dict(augment=split == "train" if augment is None else augment, normalize=normalize, seed=seed)
    name = str(name_or_path)
    if split == "test" or _has_val_folder(name):
        return _whole_split(name, task, split, image_size, root, options)
    if val_share == 0 and split == "val":
        raise DataError(f"{name} has no 'val' split with val_share=0: give a val_share above 0 to hold out a "
                        f"share of its training split{'' if name in DATASETS else ', or add a val/ sub-folder'}")
    train = _whole_split(name, task, "train", image_size, root, options)
    if val_share == 0:
        return train
    train, val = split_off(train, val_share)
    return train if split == "train" else val


def _has_val_folder(name: str) -> bool:
    return name not in DATASETS and (Path(name) / "val").is_dir()


def _whole_split(name: str, task: str, split: str, image_size, root, options: dict) -> Dataset:
    """One split of the dataset as it comes: a named set's "train" or "test", or
    a folder's `split` sub-folder (the folder itself when it has none)."""
    if name in DATASETS:
        if DATASETS[name] != task:
            raise DataError(f"{name} is a {DATASETS[name]} dataset, but the task is {task}")
        if name == "digits":
            return digits(split, **options)
        if name == "fashion-mnist":
            return fashion_mnist(split, root, **options)
        return FashionSegmentation(split, root=root, **options)
    folder = Path(name)
    if not folder.is_dir():
        raise DataError(f"unknown dataset {name!r}: give one of {', '.join(DATASETS)} or an existing folder "
                        f"(one sub-folder per class for classification; images/ and masks/ for segmentation)")
    folder = folder / split if (folder / split).is_dir() else folder
    if task == "classification":
        return ImageFolder(folder, image_size, **options)
    if task == "segmentation":
        return SegmentationFolder(folder, image_size, **options)
    raise DataError(f"task must be 'classification' or 'segmentation', not {task!r}")


# -- holding out a validation share ----------------------------------------------------


class Part(Dataset):
    """The items `indices` of a dataset, in that order, like torch's Subset, but
    with the dataset's `classes` and its `set_epoch` (the augmentation of item i
    stays that of the dataset's item indices[i])."""

    def __init__(self, dataset: Dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    @property
    def classes(self):
        return getattr(self.dataset, "classes", None)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]


def split_off(dataset: Dataset, share: float, seed: int = VAL_SEED) -> tuple[Dataset, Dataset]:
    """(train, val): `dataset` cut in two disjoint Parts that together hold all
    of it, val a random `share` of the items (rounded, at least one, never all),
    drawn from `seed` alone, so the same dataset and share give the same cut in
    every run. Not stratified. Both keep the items' order in `dataset`.
    A dataset that composes its samples from source items (FashionSegmentation)
    has its own split_off, which cuts the sources the same way instead."""
    if hasattr(dataset, "split_off"):
        return dataset.split_off(share, seed)
    train, val = cut(len(dataset), share, seed)
    return Part(dataset, train), Part(dataset, val)


def cut(n: int, share: float, seed: int = VAL_SEED) -> tuple[list[int], list[int]]:
    """(kept, held out): range(n) cut at random, `share` of it held out (see split_off)."""
    if not 0 < share < 1:
        raise DataError(f"share={share}: give the share of the items to hold out, in (0, 1)")
    if n < 2:
        raise DataError(f"cannot hold out a share of {n} item(s): a train and a val part need 2 or more")
    count = min(max(1, round(share * n)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[count:]), sorted(order[:count])


def batches(data, count: int, batch_size: int, labels: bool = True, shuffle: bool = True) -> list:
    """The first `count` batches of data, as (images, labels) or (images,)
    tuples: shuffled with seed 0 (the same images in every run), or in order."""
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle,
                                         generator=torch.Generator().manual_seed(0))
    return [tuple(b) if labels else (b[0],) for _, b in zip(range(count), loader)]
