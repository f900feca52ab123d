import numpy as np
import pytest
import torch

from cellseg.data.arrays import load_arrays
from cellseg.data.manifest import split_files
from cellseg.training.dataset import CellDataset
from cellseg.training.targets import hv_maps


def test_augmented_samples_keep_instances_classes_and_recomputed_hv_consistent(
    dataset, monkeypatch
):
    import cellseg.training.dataset as dataset_module

    captured = []
    real = dataset_module.hv_maps
    monkeypatch.setattr(dataset_module, "hv_maps", lambda m: captured.append(m.copy()) or real(m))
    ds = CellDataset(dataset, "train", (64, 96), augment=True, seed=3)
    stem = split_files(dataset, "train")[0]
    original = load_arrays(dataset / "targets" / f"{stem}.npz")
    class_of = {
        int(i): int(np.bincount(original["classes"][original["instance"] == i]).argmax())
        for i in np.unique(original["instance"])
        if i
    }
    images = set()
    for epoch in range(8):
        s = ds[epoch, 0]
        assert s["image"].shape == (3, 64, 96) and s["hv"].shape == (2, 64, 96)
        inst = (s["np"] > 0).numpy()
        nc = s["nc"].numpy()
        # nearest-neighbour: no new labels and no blended classes
        assert set(np.unique(nc)) <= {0, 1, 2, 3} and (nc[~inst] == 0).all()
        aug = captured[-1]
        assert set(np.unique(aug[aug > 0])) <= set(class_of)
        for i in np.unique(aug[aug > 0]):
            assert set(np.unique(nc[aug == i])) == {class_of[int(i)]}
        assert s["ignore"].dtype == torch.bool
        images.add(s["image"].numpy().tobytes())
    assert len(images) == 8  # a different view each epoch
    # The same (seed, epoch, index) gives the same sample: resumable, rank-independent.
    a, b = ds[5, 0], ds[5, 0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hv_targets_are_recomputed_from_the_augmented_instance_map(dataset, monkeypatch):
    seen = {}
    import cellseg.training.dataset as dataset_module

    real = dataset_module.hv_maps

    def spy(instance):
        seen["instance"] = instance.copy()
        return real(instance)

    monkeypatch.setattr(dataset_module, "hv_maps", spy)
    ds = CellDataset(dataset, "train", (64, 96), augment=True, seed=1)
    sample = ds[0]
    assert seen["instance"].shape == (64, 96)  # after augmentation, at the output size
    assert np.array_equal(sample["hv"].numpy(), hv_maps(seen["instance"]))
    assert np.array_equal(sample["np"].numpy(), (seen["instance"] > 0).astype(np.int64))


def test_training_crops_keep_the_inference_scale(dataset, monkeypatch):
    """Crops are cut at ``image_size``'s scale (jittered by at most CROP_SCALE_JITTER), where
    whole-frame training zooms in: a cell lying wholly inside a crop keeps its area."""
    import cv2

    import cellseg.training.dataset as dataset_module
    from cellseg.training.augment import CROP_SCALE_JITTER

    captured = []
    real = dataset_module.hv_maps
    monkeypatch.setattr(dataset_module, "hv_maps", lambda m: captured.append(m.copy()) or real(m))
    size, crop = (64, 96), 48
    ds = CellDataset(dataset, "train", size, augment=True, seed=0, crop=crop)
    stem = split_files(dataset, "train")[0]
    full = load_arrays(dataset / "targets" / f"{stem}.npz")["instance"]
    at_inference = cv2.resize(full, size[::-1], interpolation=cv2.INTER_NEAREST)
    area = np.bincount(at_inference.ravel())
    ratios = []
    for epoch in range(12):
        s = ds[epoch, 0]
        assert s["image"].shape == (3, crop, crop) and s["hv"].shape == (2, crop, crop)
        inst = captured[-1]
        edge = np.unique(np.concatenate([inst[0], inst[-1], inst[:, 0], inst[:, -1]]))
        for i in np.setdiff1d(np.unique(inst[inst > 0]), edge):
            ratios.append((inst == i).sum() / area[i])
    assert ratios  # some cells lay wholly inside a crop
    bound = CROP_SCALE_JITTER**2 * 1.1 * 1.25  # scale, aspect 0.9-1.1, nearest-neighbour edges
    assert 1 / bound < min(ratios) and max(ratios) < bound


def test_crop_windows_fit_jitter_and_focus_on_the_weighted_classes():
    from cellseg.training.augment import CROP_SCALE_JITTER, crop_window

    classes = np.zeros((120, 160), np.uint8)
    classes[10:60, 10:60] = 1  # a red cell
    classes[100:106, 140:146] = 3  # a platelet in a corner
    rng = np.random.default_rng(0)

    def windows(n, focus, weights):
        return [crop_window(classes, 40, rng, focus, weights) for _ in range(n)]

    for rows, cols in windows(200, 0.5, (0.05, 0.5, 5.0, 8.0)):
        side = rows.stop - rows.start
        assert side == cols.stop - cols.start  # square
        assert 40 / CROP_SCALE_JITTER - 1 <= side <= 40 * CROP_SCALE_JITTER + 1
        assert rows.start >= 0 and rows.stop <= 120 and cols.start >= 0 and cols.stop <= 160

    def platelet_share(focus, weights):
        return np.mean([(classes[w] == 3).any() for w in windows(300, focus, weights)])

    assert platelet_share(1.0, (0, 0, 0, 1)) == 1.0  # every focused window holds the platelet
    uniform = platelet_share(0.0, (0.05, 0.5, 5.0, 8.0))
    focused = platelet_share(1.0, (0.05, 0.5, 5.0, 8.0))
    assert uniform < 0.2 and focused > 0.8  # 8 / (0.5 + 8) of the focused windows, and chance


def test_persistent_loader_workers_see_each_new_epoch(dataset):
    """Workers outlive epochs; the sampler hands them the epoch with every index, so epoch 1
    is augmented anew, exactly as the dataset itself draws (seed, epoch, index)."""
    from cellseg.training.config import load_config
    from cellseg.training.distributed import World
    from cellseg.training.loop import make_loader
    from tests.conftest import TINY

    config = load_config("local", 1, [*TINY, "num_workers=1", "batch_size=1"])
    ds = CellDataset(dataset, "train", (64, 96), augment=True, seed=0, crop=48)
    loader, sampler = make_loader(ds, World(0, 1, 0, torch.device("cpu")), config, False, 0)
    assert loader.persistent_workers
    seen = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen.append([batch["image"][0] for batch in loader])
    assert not torch.equal(seen[0][0], seen[1][0])
    for epoch in (0, 1):
        assert all(torch.equal(img, ds[epoch, i]["image"]) for i, img in enumerate(seen[epoch]))


def test_samples_are_shrunk_as_inference_shrinks_images(dataset):
    """Training and validation see the pixels the Predictor feeds the network: INTER_AREA when
    shrinking (linear resampling aliases the stain texture at 0.4x)."""
    import cv2

    from cellseg.data.arrays import load_sample

    size = (64, 96)
    ds = CellDataset(dataset, "val", size, augment=False)
    raw = load_sample(dataset, ds.files[0])["image"]
    expected = cv2.resize(raw, size[::-1], interpolation=cv2.INTER_AREA)
    got = ds[0]["image"].numpy().transpose(1, 2, 0)  # uint8, as the loader hands it on
    assert np.array_equal(got, expected)
    linear = cv2.resize(raw, size[::-1], interpolation=cv2.INTER_LINEAR)
    assert not np.array_equal(got, linear)  # the two differ on this image, so the check bites


@pytest.mark.timeout(120)
def test_loader_workers_start_after_the_parent_used_opencv_threads(dataset):
    """A parent that ran OpenCV's thread pool (evaluation, earlier tests) still gets working
    workers: a worker that changed its OpenCV thread count after the fork hung for good."""
    import cv2

    from cellseg.training.config import load_config
    from cellseg.training.distributed import World
    from cellseg.training.loop import make_loader
    from tests.conftest import TINY

    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        for _ in range(20):  # start the pool
            cv2.GaussianBlur(np.random.rand(2000, 2000).astype(np.float32), (0, 0), 5)
        config = load_config("local", 1, [*TINY, "num_workers=1", "batch_size=2"])
        ds = CellDataset(dataset, "train", (64, 96), augment=True, crop=48)
        loader, _ = make_loader(ds, World(0, 1, 0, torch.device("cpu")), config, False, 0)
        assert sum(len(batch["image"]) for batch in loader) == len(ds)
        assert cv2.getNumThreads() == 1  # what the forked workers inherit
    finally:
        cv2.setNumThreads(threads)
