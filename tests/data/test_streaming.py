"""The streamed image folder (normbench/data/streaming.py): which samples each step and
each rank reads, that the batches depend on the step alone (not on workers, not on a
restart), the ImageNet transforms against torchvision's functional ops, the channel
statistics against a direct computation, unreadable files, and when a folder streams."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from normbench.data.images import check_image_folder, imagefolder_dataset
from normbench.data.streaming import ShardedEpochs, StreamedImages, position_seeds
from normbench.data.synthetic import write_shapes_folder
from normbench.errors import UserError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    write_shapes_folder(root, n_train=60, n_val=23, min_size=20, max_size=70)
    return root


def stream(folder, **options) -> StreamedImages:
    options = {"image_size": 24, "stream": True, "workers": 0, **options}
    return imagefolder_dataset(str(folder), **options)


def epoch_keys(n, b, seed, epoch, rank, world):
    sampler = ShardedEpochs(n, b, seed, rank, world)
    sampler.epoch = epoch
    return list(sampler)


@pytest.mark.parametrize("n,b,world", [(60, 4, 2), (61, 3, 2), (60, 2, 3), (7, 2, 1)])
def test_ranks_read_disjoint_slices_of_one_permutation_that_together_are_the_epoch(n, b, world):
    for epoch in (0, 1):
        perm, seeds = position_seeds(5, epoch, n)
        shards = [epoch_keys(n, b, 5, epoch, r, world) for r in range(world)]
        steps = n // (b * world)
        assert all(len(shard) == steps for shard in shards)
        for step in range(steps):  # step s: the global batch [s*B, (s+1)*B), rank r's slice
            merged = [key for r in range(world) for key in shards[r][step]]
            lo, hi = step * b * world, (step + 1) * b * world
            assert merged == list(zip(perm[lo:hi].tolist(), seeds[lo:hi].tolist(), strict=True))
        read = [i for shard in shards for batch in shard for i, _ in batch]
        assert len(read) == len(set(read)) == steps * b * world  # disjoint; the tail is dropped
        assert sorted(read) == sorted(perm[:steps * b * world].tolist())
    assert not torch.equal(position_seeds(5, 0, n)[0], position_seeds(5, 1, n)[0]) or n < 3


def test_with_one_process_at_the_global_batch_the_keys_are_the_ranks_keys_together():
    one = epoch_keys(60, 8, 3, 0, 0, 1)
    two = [epoch_keys(60, 4, 3, 0, r, 2) for r in range(2)]
    assert one == [a + b for a, b in zip(*two, strict=True)]


def test_resuming_the_sampler_mid_epoch_continues_the_same_keys():
    whole = epoch_keys(60, 4, 1, 2, 0, 1)
    sampler = ShardedEpochs(60, 4, 1)
    sampler.epoch, sampler.start = 2, 6
    assert list(sampler) == whole[6:] and len(sampler) == len(whole) - 6


def batches(loader, k):
    return [(b.x.clone(), b.y.clone()) for b in itertools.islice(loader, k)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_depend_on_the_step_alone_not_on_workers_or_a_restart(folder):
    ds = stream(folder)
    one = ds.train_loader(8, seed=4)
    steps = one.steps_per_epoch  # 7: two epochs and a bit below
    reference = batches(one, 2 * steps + 3)
    assert_same(batches(stream(folder, workers=2).train_loader(8, seed=4), 2 * steps + 3), reference)
    for cut in (3, steps, steps + 1):  # mid-epoch, at the end of an epoch, one past it
        first = ds.train_loader(8, seed=4)
        batches(first, cut)
        state = first.state_dict()
        again = stream(folder, workers=2).train_loader(8, seed=4)
        again.load_state_dict(state)
        assert_same(batches(again, 2 * steps + 3 - cut), reference[cut:])
    other = batches(ds.train_loader(8, seed=5), 1)
    assert not torch.equal(other[0][0], reference[0][0])
    assert reference[0][0].shape == (8, 3, 24, 24) and reference[0][0].dtype == torch.float32


def test_training_and_validation_transforms_are_imagenet_s(folder):
    ds = stream(folder, image_size=24)
    path, label = ds.val_files.path(0), int(ds.val_files.labels[0])
    image = decode_image(path, mode=ImageReadMode.RGB)
    # validation: the shorter side to round(24 * 8/7) = 27, then the central 24 x 24
    want = TF.center_crop(TF.resize(image, 27, antialias=True), [24, 24])
    first = next(ds.val_batches(5))
    assert torch.allclose(first.x[0], ds.normalize(want[None])[0]) and first.y[0] == label
    # training: a random resized crop drawn from the position's seed, then maybe a flip
    out = [ds.train_transform(image) for _ in range(20)]
    assert all(o.shape == (3, 24, 24) and o.dtype == torch.uint8 for o in out)
    assert len({o.sum().item() for o in out}) > 1  # random crops differ


def test_validation_is_in_file_order_or_shuffled_and_strided_over_ranks(folder):
    ds = stream(folder)
    labels = torch.cat([b.y for b in ds.val_batches(5)])
    assert labels.tolist() == ds.val_files.labels.tolist()
    shuffled = torch.cat([b.y for b in ds.val_batches(5, shuffle_seed=2)])
    order = torch.randperm(23, generator=torch.Generator().manual_seed(2))
    assert shuffled.tolist() == ds.val_files.labels[order.numpy()].tolist()
    parts = [torch.cat([b.x for b in ds.val_batches(4, rank=r, world=2)]) for r in range(2)]
    whole = torch.cat([b.x for b in ds.val_batches(4)])
    assert parts[0].shape[0] == 12 and parts[1].shape[0] == 11
    assert torch.equal(parts[0], whole[0::2]) and torch.equal(parts[1], whole[1::2])


def test_channel_statistics_are_those_of_the_images_they_were_taken_from(folder):
    ds = stream(folder, seed=3)
    pick = torch.randperm(60, generator=torch.Generator().manual_seed(3))  # STATS_IMAGES > 60
    images = torch.stack([ds.val_transform(decode_image(ds.train_files.path(int(i)),
                                                        mode=ImageReadMode.RGB)) for i in pick])
    pixels = images.transpose(0, 1).reshape(3, -1).double() / 255
    torch.testing.assert_close(ds.mean, pixels.mean(1).float())
    torch.testing.assert_close(ds.std, pixels.std(1).float())


def test_an_unreadable_file_is_skipped_counted_and_named_once(folder, tmp_path, capfd):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    ds0 = stream(root)
    first_batch = next(iter(ds0.train_loader(8, seed=0).batches))
    bad = ds0.train_files.path(first_batch[3][0])
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[:len(data) // 2])  # a truncated JPEG, in the first batch
    capfd.readouterr()
    ds = stream(root)  # the channel statistics read it first: the warning comes then, once
    loader = ds.train_loader(8, seed=0)
    sizes = [b.size for b in itertools.islice(loader, 2 * loader.steps_per_epoch)]
    assert sizes.count(7) in (1, 2) and set(sizes) <= {7, 8}  # once per epoch it is drawn in
    err = capfd.readouterr().err
    assert err.count("normbench: warning: skipped the unreadable image") == 1 and bad in err
    assert "truncated" in err
    assert loader.skipped_draws == sizes.count(7)
    assert list(ds.facts()["unreadable_images"]) == [bad]
    other = ds.train_loader(8, seed=9)  # another stream of the same folder (PreciseBN's)
    list(itertools.islice(other, other.steps_per_epoch))
    assert loader.skipped_draws == sizes.count(7)  # counts its own samples only
    state = loader.state_dict()  # the counts travel with the checkpoint
    fresh = stream(root)
    resumed = fresh.train_loader(8, seed=0)
    resumed.load_state_dict(state)
    assert resumed.skipped_draws == loader.skipped_draws
    assert fresh.facts() == ds.facts()


def test_a_rank_whose_whole_slice_is_unreadable_keeps_step_with_the_others(folder, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    ds = stream(root)
    keys = [next(iter(ds.train_loader(1, seed=0, rank=r, world=2).batches))[0][0] for r in (0, 1)]
    first = ds.train_loader(1, seed=0, rank=1, world=2)
    batches(first, 2)  # a good first batch: rank 1's second batch is the one emptied below
    second_key = list(first.batches.__class__(60, 1, 0, 1, 2))[1][0][0]
    open(ds.train_files.path(second_key), "wb").close()  # an empty file
    ranks = [stream(root).train_loader(1, seed=0, rank=r, world=2) for r in (0, 1)]
    got = [batches(loader, 3) for loader in ranks]
    assert [(r.epoch, r.step) for r in ranks] == [(0, 3), (0, 3)]  # still in step
    assert torch.equal(got[1][1][0], got[1][0][0])  # rank 1 repeated its previous batch
    assert ranks[1].skipped_draws == 1 and ranks[0].skipped_draws == 0
    assert keys[0] != keys[1]


def test_reading_and_resuming_never_move_the_global_rng(folder):
    ds = stream(folder)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    loader = ds.train_loader(8, seed=0)
    batches(loader, 3)
    list(ds.val_batches(5))
    again = ds.train_loader(8, seed=0)
    again.load_state_dict(loader.state_dict())
    batches(again, 2)
    assert torch.equal(torch.get_rng_state(), state)


def test_16_bit_pngs_are_scaled_to_8_bits_and_undecodable_formats_are_not_listed(tmp_path):
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            deep = np.full((12, 10), 65535 if name == "a" else 257 * 100, dtype=np.uint16)
            Image.fromarray(deep).save(folder / "deep.png")  # 16-bit greyscale
            Image.new("RGB", (9, 9), (10, 20, 30)).save(folder / "flat.png")
            Image.new("RGB", (9, 9)).save(folder / "skip.bmp")  # torchvision.io cannot read BMP
    ds = stream(tmp_path, image_size=8)
    assert ds.n_train == 4 and not ds.unreadable
    x = torch.cat([b.x for b in ds.val_batches(4)]) * ds.std[:, None, None] + ds.mean[:, None, None]
    values = sorted({round(v * 255) for v in x.flatten().tolist()})
    assert values == [10, 20, 30, 100, 255]
    kept = imagefolder_dataset(str(tmp_path), image_size=8, stream=False)
    assert sorted(kept.val_x.flatten().unique().tolist()) == [10, 20, 30, 100, 255]


def test_a_validation_set_that_cannot_be_read_at_all_is_one_line(tmp_path):
    from normbench.engine.evaluation import evaluate

    write_shapes_folder(tmp_path, n_train=10, n_val=10, min_size=20, max_size=30)
    for path in (tmp_path / "val").rglob("*.jpg"):
        path.write_bytes(b"")
    ds = stream(tmp_path)
    with pytest.raises(UserError, match="no validation sample of imagefolder:.* could be read"):
        evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10)), ds, 4)


def test_a_folder_streams_when_it_exceeds_the_memory_budget(folder):
    # 83 images at 24 px: 83 * 3 * 24 * 24 bytes = 143 kB
    assert isinstance(imagefolder_dataset(str(folder), image_size=24, memory_budget_gb=1e-4,
                                          workers=0), StreamedImages)
    kept = imagefolder_dataset(str(folder), image_size=24, memory_budget_gb=1e-3)
    assert not isinstance(kept, StreamedImages) and kept.train_x.shape == (60, 3, 24, 24)
    assert not isinstance(imagefolder_dataset(str(folder), image_size=24, stream=False,
                                              memory_budget_gb=1e-9), StreamedImages)


def test_the_layout_checks_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="dataset.root=.*/missing does not exist"):
        check_image_folder(str(tmp_path / "missing"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="dataset.root=.*/a_file is not a folder"):
        check_image_folder(str(tmp_path / "a_file"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty/train is not a folder"):
        check_image_folder(str(tmp_path / "empty"))
    for split in ("train", "val"):
        (tmp_path / "noclass" / split).mkdir(parents=True)
    with pytest.raises(UserError, match="noclass/train has no class subfolders"):
        check_image_folder(str(tmp_path / "noclass"))
    for split, names in (("train", ("a", "b")), ("val", ("a", "b", "c"))):
        for name in names:
            (tmp_path / "odd" / split / name).mkdir(parents=True)
    with pytest.raises(UserError, match=r"differ .*\(only val/ has c\)"):
        check_image_folder(str(tmp_path / "odd"))
