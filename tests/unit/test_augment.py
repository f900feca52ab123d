import numpy as np
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
        ds.set_epoch(epoch)
        s = ds[0]
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
    ds.set_epoch(5)
    a, b = ds[0], ds[0]
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
