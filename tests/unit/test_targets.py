import numpy as np

from cellseg.training.targets import hv_maps


def test_hv_maps_of_a_disc_are_normalised_offsets_from_its_centre():
    yy, xx = np.mgrid[0:41, 0:41]
    disc = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 10**2).astype(np.uint16)
    hv = hv_maps(disc)
    assert hv.shape == (2, 41, 41) and hv.dtype == np.float32
    inside = disc > 0
    # Symmetric disc: centroid at (20, 20), extreme offsets ±10, so the map is (x - 20) / 10.
    np.testing.assert_allclose(hv[0][inside], ((xx - 20) / 10)[inside], atol=1e-6)
    np.testing.assert_allclose(hv[1][inside], ((yy - 20) / 10)[inside], atol=1e-6)
    assert hv[:, ~inside].max() == 0 and hv[:, ~inside].min() == 0


def test_hv_maps_scale_each_side_of_each_instance_separately():
    inst = np.zeros((5, 12), np.uint16)
    inst[2, 0:4] = 1  # x = 0..3, centre 1.5: offsets -1.5..1.5
    inst[2, 6:12] = 7  # x = 6..11, centre 8.5; label ids need not be consecutive
    hv = hv_maps(inst)
    np.testing.assert_allclose(hv[0, 2, 0:4], [-1, -1 / 3, 1 / 3, 1], atol=1e-6)
    np.testing.assert_allclose(hv[0, 2, 6:12], np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]) / 2.5)
    assert np.all(hv[1] == 0)  # one row: no vertical offsets


def test_hv_maps_of_an_empty_map_are_zero():
    assert not hv_maps(np.zeros((8, 8), np.uint16)).any()
