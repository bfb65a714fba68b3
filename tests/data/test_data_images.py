"""Image data: batch augmentation vs a per-image reference, shapes, CIFAR and image folders."""

import tarfile

import pytest
import torch
import torchvision

from normbench.data import build_dataset
from normbench.data.images import (
    cifar_dataset,
    imagefolder_dataset,
    random_crop_flip,
    resize_images,
    stratified_subset,
)
from normbench.data.synthetic import SHAPE_CLASSES, render_shapes
from normbench.errors import UserError
from tests.helpers.images import install_cifar10_fixture, md5, write_cifar10_fixture, write_imagefolder


def test_batch_crop_flip_equals_per_image_crop_and_flip():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, pad=2, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay the same draws
    shift = torch.randint(0, 5, (2, 6), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        dy, dx = shift[0, i].item(), shift[1, i].item()
        ref = padded[i, :, dy:dy + 8, dx:dx + 8]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_shapes_are_deterministic_balanced_and_seed_dependent():
    a, la = render_shapes(400, seed=1)
    b, lb = render_shapes(400, seed=1)
    c, _ = render_shapes(400, seed=2)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == (400, 3, 32, 32)
    counts = torch.bincount(la, minlength=len(SHAPE_CLASSES))
    assert counts.min() > 20  # every class present in roughly equal share


def test_standardization_comes_from_the_training_split():
    ds = build_dataset("shapes", n_train=200, n_val=50)
    x = ds.train_x.float() / 255
    torch.testing.assert_close(ds.mean, x.mean(dim=(0, 2, 3)), atol=1e-5, rtol=0)
    batch = next(iter(ds.val_batches(50)))
    assert batch.x.shape == (50, 3, 32, 32) and batch.x.dtype == torch.float32


def test_loader_drops_the_tail_and_reshuffles_each_epoch():
    ds = build_dataset("shapes", n_train=100, n_val=10, augment=False)
    loader = ds.train_loader(batch_size=32, seed=0)
    assert loader.steps_per_epoch == 3
    first = [next(loader).y for _ in range(3)]
    second = [next(loader).y for _ in range(3)]
    assert all(b.numel() == 32 for b in first + second)
    assert loader.epoch == 1 and not torch.equal(torch.cat(first), torch.cat(second))


def test_loader_state_resumes_the_same_stream():
    ds = build_dataset("shapes", n_train=100, n_val=10)
    a = ds.train_loader(16, seed=4)
    for _ in range(7):
        next(a)
    b = ds.train_loader(16, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert torch.equal(next(a).x, next(b).x)


def test_stratified_subset_is_balanced_deterministic_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    keep = stratified_subset(labels, 9, seed=0, key="dataset.n_train", what="images")
    assert torch.bincount(labels[keep]).tolist() == [3, 3, 3]
    assert keep.unique().numel() == 9 and torch.equal(keep, keep.sort().values)
    # 10 = 3 x 3 + 1: one class gets one more; class 1 has only 3, the others fill in.
    assert sorted(torch.bincount(labels[stratified_subset(labels, 10, 0, "k", "x")]).tolist()) == [3, 3, 4]
    assert torch.bincount(labels[stratified_subset(labels, 15, 0, "k", "x")]).tolist() == [6, 3, 6]
    assert torch.equal(keep, stratified_subset(labels, 9, 0, "k", "x"))
    assert not torch.equal(keep, stratified_subset(labels, 9, 1, "k", "x"))
    assert stratified_subset(labels, None, 0, "k", "x").tolist() == list(range(20))
    with pytest.raises(UserError, match=r"dataset.n_train=21 is more than the 20 images.*"
                                        r"dataset.n_train=20 or fewer"):
        stratified_subset(labels, 21, 0, "dataset.n_train", "images")


# ----------------------------------------------------------------------------- CIFAR fixture


@pytest.fixture
def cifar_fixture(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    return root, install_cifar10_fixture(root, monkeypatch)


def test_cifar_loads_from_its_on_disk_format(cifar_fixture):
    root, files = cifar_fixture
    ds = cifar_dataset("cifar10", root=str(root), download=False)
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.val_x.shape == (20, 3, 32, 32)
    data, labels = files["data_batch_1"]
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values, row-major.
    assert torch.equal(ds.train_x[0], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert ds.train_y[:20].tolist() == labels
    assert ds.info.num_classes == 10


def test_cifar_keeps_a_stratified_subset_of_real_rows_and_resizes(cifar_fixture):
    root, files = cifar_fixture
    full = cifar_dataset("cifar10", root=str(root), download=False)
    ds = cifar_dataset("cifar10", root=str(root), download=False, n_train=30, n_val=10)
    assert (ds.n_train, ds.n_val) == (30, 10)
    # Each kept image is a row of the split, with its own label.
    source = {full.train_x[i].numpy().tobytes(): full.train_y[i].item() for i in range(100)}
    assert all(source[x.numpy().tobytes()] == y for x, y in zip(ds.train_x, ds.train_y.tolist(), strict=True))
    available = torch.bincount(full.train_y, minlength=10)
    counts = torch.bincount(ds.train_y, minlength=10)
    assert available.min() >= 3  # the fixture holds at least 3 images of each class
    assert counts.tolist() == [3] * 10
    small = cifar_dataset("cifar10", root=str(root), download=False, n_train=30, n_val=10,
                          image_size=16)
    assert small.train_x.shape == (30, 3, 16, 16) and small.info.image_size == 16
    assert torch.equal(small.train_x, resize_images(ds.train_x, 16))  # same images, antialiased
    assert torch.equal(small.train_y, ds.train_y)
    with pytest.raises(UserError, match="dataset.n_val=21 is more than the 20 validation images"):
        cifar_dataset("cifar10", root=str(root), download=False, n_val=21)


@pytest.mark.slow
def test_a_run_on_cifar_records_the_sizes_it_used(cifar_fixture, tmp_path):
    import json

    from normbench.config.checks import check_config
    from normbench.engine.train import run_experiment
    from tests.helpers.common import compose_config

    root, _ = cifar_fixture
    config = compose_config(["dataset=cifar10", f"dataset.root={root}", "dataset.download=false",
                             "dataset.n_train=40", "dataset.n_val=10", "dataset.image_size=16",
                             "batch_size=8", "steps=2", "log_every=1", "model.depth=8",
                             "probes=false"])
    check_config(config)
    run_experiment(config, tmp_path / "run", live=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["n_train"], summary["n_val"], summary["status"]) == (40, 10, "completed")


def test_cifar_downloads_through_torchvision(tmp_path, monkeypatch, http_server):
    source = tmp_path / "source"
    write_cifar10_fixture(source)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    folder = source / "cifar-10-batches-py"
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "url", http_server(tmp_path) + "/" + archive.name)
    monkeypatch.setattr(cls, "tgz_md5", md5(archive))
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")]
                                            for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / "batches.meta")})
    ds = cifar_dataset("cifar10", root=str(tmp_path / "cache"), download=True)
    assert ds.n_train == 100 and (tmp_path / "cache" / "cifar-10-python.tar.gz").exists()


def test_cifar_offline_is_one_clear_line(tmp_path, monkeypatch):
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "url", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(UserError) as err:
        cifar_dataset("cifar10", root=str(tmp_path / "empty"), download=True)
    line = err.value.line()
    assert "cifar10" in line and "cifar-10-python.tar.gz" in line and "\n" not in line


def test_imagefolder_reads_classes_and_resizes(tmp_path):
    write_imagefolder(tmp_path)
    ds = imagefolder_dataset(root=str(tmp_path), image_size=16)
    assert ds.train_x.shape == (12, 3, 16, 16) and ds.info.num_classes == 3
    assert ds.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.train_x[5].float().mean().item() == pytest.approx(41, abs=1)


def test_imagefolder_without_splits_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="train"):
        imagefolder_dataset(root=str(tmp_path))


def test_imagefolder_keeps_a_stratified_subset(tmp_path):
    write_imagefolder(tmp_path)  # 3 classes x 4 images per split
    ds = imagefolder_dataset(root=str(tmp_path), image_size=16, n_train=7, n_val=3)
    assert (ds.n_train, ds.n_val) == (7, 3)
    assert sorted(torch.bincount(ds.train_y).tolist()) == [2, 2, 3]
    assert torch.bincount(ds.val_y).tolist() == [1, 1, 1]
    # The image of class k, file i, is filled with 40k + i: the labels match the pixels.
    assert all(abs(x.float().mean().item() - 40 * y) < 4 for x, y in zip(ds.train_x, ds.train_y, strict=True))
    again = imagefolder_dataset(root=str(tmp_path), image_size=16, n_train=7, n_val=3)
    assert torch.equal(ds.train_x, again.train_x)
    with pytest.raises(UserError, match="dataset.n_train=13 is more than the 12 images"):
        imagefolder_dataset(root=str(tmp_path), n_train=13)
