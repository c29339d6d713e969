import nibabel as nib
import numpy as np
import pytest

from neurojepa_pl.synth import labels as L
from neurojepa_pl.synth.atlas import POINT_MARGIN_MM, load_atlas
from neurojepa_pl.synth.grids import MNI_SHAPE, MODEL_SHAPE, mni_affine, world_to_voxel

TINY_GRID = (48, 54, 48)


@pytest.fixture(scope="module")
def mni_maps():
    from neurojepa_pl.synth.atlas import _mni_maps_cached

    return _mni_maps_cached()


def test_mni_maps_match_the_measured_template_facts(mni_maps):
    maps, centres, push = mni_maps
    assert maps.shape == (6, *MNI_SHAPE)
    gm, wm, csf = maps[0], maps[1], maps[2]
    # docs/data_notes.md §1: ICV 2038 ml, CSF 360 ml on the FSL 1 mm grid.
    assert float((gm + wm + csf).sum()) / 1000 == pytest.approx(2038, rel=0.01)
    assert float(csf.sum()) / 1000 == pytest.approx(360, rel=0.02)
    # Lateral ventricles: a symmetric pair about 13 mm either side of the midline, not the midline third ventricle.
    assert centres[0, 0] == pytest.approx(-centres[1, 0], abs=1.0)
    assert 8 < centres[1, 0] < 20
    assert 0.5 < push.max_safe_mm < 10


def test_mni_atlas_grid_and_points():
    atlas = load_atlas("mni")
    assert atlas.shape == MNI_SHAPE
    assert np.array_equal(atlas.affine, mni_affine())
    assert nib.aff2axcodes(atlas.affine) == ("R", "A", "S")
    icv = atlas.full("icv") > 0
    # Every ICV voxel is a synthesis point; no point is further than the margin from the ICV.
    points = np.zeros(np.prod(atlas.shape), dtype=bool)
    points[atlas.point_full_index.numpy()] = True
    assert points.reshape(atlas.shape)[icv].all()
    assert atlas.n_points < 0.5 * np.prod(MNI_SHAPE)


def test_model_grid_follows_the_reference_chain():
    atlas = load_atlas("model")
    assert atlas.shape == MODEL_SHAPE
    assert nib.aff2axcodes(atlas.affine) == ("R", "A", "S")
    spacing = atlas.spacing_mm
    # Foreground crop of about 157x162x160 mm resized to 100x120x100: 1.5-1.7 mm voxels, not isotropic.
    assert np.all((spacing > 1.4) & (spacing < 1.8))
    # Tissue volumes survive the resampling (in ml, the 96-wide crop trims a little of the lateral cortex).
    mni = load_atlas("mni")
    for name in ("gm", "wm"):
        model_ml = atlas.full(name).sum() * atlas.voxel_ml
        mni_ml = mni.full(name).sum() * mni.voxel_ml
        assert model_ml == pytest.approx(mni_ml, rel=0.03)
    # The anterior commissure region (MNI origin) is inside the grid and WM-rich in both atlases.
    origin = np.round(world_to_voxel(atlas.affine, np.array([0.0, 0.0, 0.0]))).astype(int)
    assert np.all((origin >= 0) & (origin < MODEL_SHAPE))


def test_tiny_grid_is_the_model_atlas_resampled():
    atlas = load_atlas(TINY_GRID)
    model = load_atlas("model")
    assert atlas.shape == TINY_GRID
    assert np.allclose(atlas.spacing_mm, model.spacing_mm * 2, rtol=1e-6)
    assert atlas.full("wm").sum() * atlas.voxel_ml == pytest.approx(model.full("wm").sum() * model.voxel_ml, rel=0.01)
    assert POINT_MARGIN_MM > 0


@pytest.mark.parametrize(
    "sites, tissue, minimum",
    [
        (L.TUMOUR_SITES_MM, ("wm",), 0.8),
        (L.HAEMORRHAGE_SITES_MM, ("gm", "wm"), 0.9),
        (L.INFARCT_SITES_MM, ("gm", "wm"), 0.7),
    ],
)
def test_lesion_sites_lie_in_the_intended_tissue(mni_maps, sites, tissue, minimum):
    maps = mni_maps[0]
    channel = {"gm": 0, "wm": 1}
    for site in sites:
        for sign in (1.0, -1.0):
            point = np.array(site) * np.array([sign, 1.0, 1.0])
            voxel = tuple(np.round(world_to_voxel(mni_affine(), point)).astype(int))
            fraction = sum(float(maps[channel[t]][voxel]) for t in tissue)
            assert fraction >= minimum, f"{point} has {tissue} fraction {fraction:.2f}"
