"""Datasets: the IDX reader, Fashion-MNIST, digits, image and segmentation
folders, the Fashion-MNIST segmentation set, augmentation, resolve_data and
the val split it holds out of the training data."""
import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cpdfx
from cpdfx import data
from cpdfx.data import DataError

DEBIAN = data.FASHION_ROOT
HAVE_DEBIAN = all(os.path.exists(f"{DEBIAN}/{p}-{k}-ubyte.gz") for p in ("train", "t10k")
                  for k in ("images-idx3", "labels-idx1"))
needs_debian = pytest.mark.skipif(not HAVE_DEBIAN, reason=f"Fashion-MNIST is not in {DEBIAN} "
                                  "(apt-get install dataset-fashion-mnist)")


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(root, n_train=40, n_test=12, seed=0, classes=tuple(range(10))):
    """Four IDX files of 28x28 items: a 10x10 block, as bright as its class is high
    (so the class can be learnt), with a faint halo around it."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), np.uint8)
        labels = rng.choice(classes, n)
        for img, label in zip(images, labels):
            top, left = rng.integers(2, 16, 2)
            img[top - 2:top + 12, left - 2:left + 12] = 10  # below the threshold: not the item
            img[top:top + 10, left:left + 10] = 40 + 20 * label + rng.integers(0, 10, (10, 10))
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def fake_root(tmp_path):
    return fake_fashion(tmp_path)


def test_idx_reader_reads_what_was_written(fake_root):
    train, test = data.fashion_mnist("train", fake_root), data.fashion_mnist("test", fake_root)
    assert (len(train), len(test)) == (40, 12)
    raw = data.read_idx(fake_root / "train-images-idx3-ubyte.gz")
    image, label = train[7]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label.dtype == torch.long
    torch.testing.assert_close(image[0], torch.from_numpy(raw[7]).float() / 255)
    assert int(label) == int(data.read_idx(fake_root / "train-labels-idx1-ubyte.gz")[7])


def test_env_var_sets_the_root(fake_root, monkeypatch):
    monkeypatch.setenv("CPDFX_FASHION_MNIST", str(fake_root))
    assert len(data.fashion_mnist("test")) == 12


def test_truncated_idx_file_is_a_data_error(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((4, 3), np.uint8))
    raw = gzip.open(tmp_path / "x.gz").read()
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(raw[:-2])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(tmp_path / "x.gz")


@needs_debian
def test_fashion_mnist_from_the_debian_files():
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28)
    assert set(train.labels.unique().tolist()) == set(range(10)) == set(test.labels.unique().tolist())
    assert (train.labels.bincount() == 6000).all()  # the set is balanced
    image, label = test[0]
    assert image.shape == (1, 28, 28) and 0 <= image.min() and image.max() <= 1 and 0 <= label < 10
    normalised = data.fashion_mnist("train", normalize=True)
    sample = torch.stack([normalised[i][0] for i in range(0, 60000, 60)])
    assert abs(float(sample.mean())) < 0.05 and abs(float(sample.std()) - 1) < 0.05


def test_missing_root_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError) as info:
        data.fashion_mnist("train", root=tmp_path / "nowhere")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "CPDFX_FASHION_MNIST" in message
    assert "root=" in message and "\n" not in message


def test_digits_split_is_fixed_and_stratified():
    train, test = data.digits("train"), data.digits("test")
    assert (len(train), len(test)) == (1347, 450)
    assert train[0][0].shape == (1, 8, 8) and 0 <= train.images.min() and train.images.max() <= 1
    assert torch.equal(data.digits("test").images, test.images)
    assert (test.labels.bincount() >= 43).all()  # stratified: a quarter of every class (the smallest has 174)


def png(path, array, mode=None):
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def test_image_folder_reads_resizes_and_labels(tmp_path):
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i, size in enumerate((10, 20, 30)):
            png(tmp_path / name / f"{i}.png", np.full((size, size + 3, 3), colour))
    (tmp_path / "red" / "notes.txt").write_text("not an image")
    folder = data.ImageFolder(tmp_path, 16)
    assert folder.classes == ("blue", "red") and len(folder) == 6
    image, label = folder[4]
    assert image.shape == (3, 16, 16) and int(label) == 1
    torch.testing.assert_close(image.mean((1, 2)), torch.tensor([1.0, 0.0, 0.0]))
    gray = data.ImageFolder(tmp_path, (8, 12), mode="L", normalize=True)
    assert gray[0][0].shape == (1, 8, 12)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.ImageFolder(tmp_path / "missing", 8)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="one sub-folder per class"):
        data.ImageFolder(tmp_path, 8)


def make_seg_folder(root, n=3):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    masks = []
    for i in range(n):
        mask = rng.integers(0, 4, (12, 12))
        png(root / "images" / f"s{i}.bmp", np.stack([mask * 60] * 3, -1))
        png(root / "masks" / f"s{i}.png", mask, "L")
        masks.append(mask)
    return masks


def test_segmentation_folder_pairs_images_and_class_index_masks(tmp_path):
    masks = make_seg_folder(tmp_path)
    folder = data.SegmentationFolder(tmp_path)
    image, mask = folder[1]
    assert image.shape == (3, 12, 12) and mask.dtype == torch.long
    assert torch.equal(mask, torch.from_numpy(masks[1]))
    resized = data.SegmentationFolder(tmp_path, 24)[1][1]
    assert resized.shape == (24, 24) and set(resized.unique().tolist()) <= {0, 1, 2, 3}
    augmented = data.SegmentationFolder(tmp_path, augment=True)
    for epoch in range(4):
        augmented.set_epoch(epoch)
        image, mask = augmented[1]
        labelled = mask != 255
        # the image is the mask times 60 wherever the mask has a label; the padding is black
        torch.testing.assert_close(image[0][labelled] * 255 / 60, mask[labelled].float())
        assert (image[:, ~labelled] == 0).all()


def test_segmentation_folder_errors(tmp_path):
    make_seg_folder(tmp_path)
    png(tmp_path / "images" / "extra.png", np.zeros((12, 12, 3)))
    with pytest.raises(DataError, match="extra"):
        data.SegmentationFolder(tmp_path)
    (tmp_path / "images" / "extra.png").unlink()
    png(tmp_path / "masks" / "s0.png", np.zeros((12, 12, 3)))  # a colour mask
    with pytest.raises(DataError, match="class-index"):
        data.SegmentationFolder(tmp_path)[0]
    with pytest.raises(DataError, match="images/ and masks/"):
        data.SegmentationFolder(tmp_path / "images")


def test_fashion_segmentation_masks_are_where_items_were_placed(fake_root):
    seg = data.FashionSegmentation("train", root=fake_root, canvas=48, items=3, seed=5)
    assert len(seg) == 40 // 3 and seg.classes[0] == "background" and len(seg.classes) == 11
    for index in range(len(seg)):
        image, mask = seg[index]
        assert image.shape == (1, 48, 48) and mask.shape == (48, 48)
        expected = torch.zeros(48, 48, dtype=torch.long)
        for source, label, top, left in seg.placements(index):
            item = torch.from_numpy(seg.images[source])
            region = expected[top:top + 28, left:left + 28]
            region[item > 0.1 * 255] = label + 1  # later items on top
        assert torch.equal(mask, expected)
        assert torch.equal(mask > 0, image[0] > 0)  # halo and background stay black
    assert torch.equal(seg[3][1], data.FashionSegmentation("train", root=fake_root, canvas=48, seed=5)[3][1])
    other = data.FashionSegmentation("train", root=fake_root, canvas=48, seed=6)
    assert not all(torch.equal(seg[i][1], other[i][1]) for i in range(5))


@needs_debian
def test_fashion_segmentation_from_real_items():
    seg = data.FashionSegmentation("test", canvas=64, items=3)
    image, mask = seg[0]
    labels = {label + 1 for _, label, _, _ in seg.placements(0)}
    assert set(mask.unique().tolist()) <= {0} | labels and len(set(mask.unique().tolist()) & labels) >= 1
    assert torch.equal(mask > 0, image[0] > 0)


def test_augmentation_is_per_sample_and_epoch_and_keeps_masks_aligned(fake_root):
    train = data.fashion_mnist("train", fake_root, augment=True)
    a, b = train[3][0], train[3][0]
    assert torch.equal(a, b)  # the same sample, epoch and seed: the same draw
    draws = []
    for epoch in range(6):
        train.set_epoch(epoch)
        draws.append(train[3][0])
    assert len({d.numpy().tobytes() for d in draws}) > 1
    assert all(d.shape == (1, 28, 28) for d in draws)
    seg = data.FashionSegmentation("train", root=fake_root, canvas=40, items=2, augment=True)
    padded = 0
    for epoch in range(6):
        seg.set_epoch(epoch)
        image, mask = seg[2]
        item = (mask >= 1) & (mask <= 10)
        assert torch.equal(item, image[0] > 0)  # flip and crop moved both the same way
        assert set(mask.unique().tolist()) <= set(range(11)) | {255}
        padded += int((mask == 255).any())  # a shifted crop leaves an unlabelled border
    assert padded >= 1


def test_resolve_data(fake_root, tmp_path):
    assert len(data.resolve_data("digits", "classification", "test")) == 450
    assert data.resolve_data("digits", split="train").dataset.augment
    assert isinstance(data.resolve_data("fashion-seg", "segmentation", "test", root=fake_root),
                      data.FashionSegmentation)
    make_seg_folder(tmp_path / "seg" / "val")
    assert len(data.resolve_data(tmp_path / "seg", "segmentation", "val")) == 3
    with pytest.raises(DataError, match="segmentation dataset"):
        data.resolve_data("fashion-seg", "classification")
    with pytest.raises(DataError, match="unknown dataset"):
        data.resolve_data("imagenet-99")


# -- the val split ----------------------------------------------------------------------


def test_val_is_a_fixed_share_of_train_and_train_the_rest():
    train, val = data.resolve_data("digits", split="train"), data.resolve_data("digits", split="val")
    assert (len(train), len(val)) == (1347 - 135, 135)  # 10% of digits' 1347 training images
    assert not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == list(range(1347))
    again = data.resolve_data("digits", split="val", seed=7)  # the run's seed does not move the cut
    assert again.indices == val.indices and data.resolve_data("digits").indices == train.indices
    whole = data.digits("train")
    image, label = val[5]
    assert torch.equal(image, whole[val.indices[5]][0]) and int(label) == int(whole.labels[val.indices[5]])
    assert train.classes == whole.classes  # what the CLI sizes a model's head from
    assert len(data.resolve_data("digits", split="val", val_share=0.3)) == round(0.3 * 1347)


def test_val_is_not_augmented_while_train_is():
    train, val = data.resolve_data("digits", split="train"), data.resolve_data("digits", split="val")
    whole = data.digits("train")
    train_draws = set()
    for epoch in range(4):
        train.set_epoch(epoch)  # distill calls it on the training data each epoch
        val.set_epoch(epoch)
        assert all(torch.equal(val[i][0], whole[val.indices[i]][0]) for i in range(0, 135, 9))
        train_draws.add(train[3][0].numpy().tobytes())
    assert len(train_draws) > 1  # set_epoch reaches the augmented dataset under the part


def test_val_share_zero_holds_nothing_out():
    assert len(data.resolve_data("digits", split="train", val_share=0)) == 1347
    with pytest.raises(DataError, match="no 'val' split with val_share=0"):
        data.resolve_data("digits", split="val", val_share=0)
    with pytest.raises(DataError, match="in \\[0, 1\\)"):
        data.resolve_data("digits", split="val", val_share=1)


def image_folder(root, per_class):
    for name, colour in (("dark", 40), ("light", 220)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            png(root / name / f"{i}.png", np.full((6, 6), colour + i))


def test_a_folder_with_val_uses_it_and_one_without_holds_out_of_train(tmp_path):
    image_folder(tmp_path / "own" / "train", 10)
    image_folder(tmp_path / "own" / "val", 3)
    train = data.resolve_data(tmp_path / "own", split="train", image_size=6)
    val = data.resolve_data(tmp_path / "own", split="val", image_size=6)
    assert isinstance(train, data.ImageFolder) and len(train) == 20  # nothing carved out of train/
    assert isinstance(val, data.ImageFolder) and len(val) == 6 and val.root == tmp_path / "own" / "val"
    image_folder(tmp_path / "carved" / "train", 10)
    train = data.resolve_data(tmp_path / "carved", split="train", image_size=6, val_share=0.25)
    val = data.resolve_data(tmp_path / "carved", split="val", image_size=6, val_share=0.25)
    assert (len(train), len(val)) == (15, 5) and sorted(train.indices + val.indices) == list(range(20))
    assert val.dataset.root == tmp_path / "carved" / "train" and not val.dataset.augment
    with pytest.raises(DataError, match="or add a val/ sub-folder"):
        data.resolve_data(tmp_path / "carved", split="val", val_share=0)


def test_fashion_segmentation_holds_out_items_not_canvases(fake_root):
    whole = data.FashionSegmentation("train", root=fake_root)
    train = data.resolve_data("fashion-seg", "segmentation", "train", root=fake_root, val_share=0.25)
    val = data.resolve_data("fashion-seg", "segmentation", "val", root=fake_root, val_share=0.25)
    assert (len(whole.sources), len(train.sources), len(val.sources)) == (40, 30, 10)
    assert sorted(train.sources.tolist() + val.sources.tolist()) == list(range(40))
    assert (len(train), len(val)) == (10, 3)  # 13 canvases of 40 items, 3 at a time, in proportion
    shown = {source for i in range(len(val)) for source, *_ in val.placements(i)}
    assert shown <= set(val.sources.tolist()) and not shown & set(train.sources.tolist())
    assert not val.augment and train.augment


def test_split_off_cuts_any_dataset():
    items = [(torch.full((1, 2, 2), float(i)), torch.tensor(i % 3)) for i in range(50)]
    train, val = cpdfx.split_off(items, 0.2)
    assert (len(train), len(val)) == (40, 10)
    assert sorted(train.indices + val.indices) == list(range(50))
    assert [int(val[i][0][0, 0, 0]) for i in range(10)] == val.indices
    assert cpdfx.split_off(items, 0.2)[1].indices == val.indices != cpdfx.split_off(items, 0.2, seed=1)[1].indices
    assert len(cpdfx.split_off(items[:2], 0.01)[1]) == 1  # at least one held out, never all
    with pytest.raises(DataError, match="2 or more"):
        cpdfx.split_off(items[:1], 0.5)
