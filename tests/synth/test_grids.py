import numpy as np
import pytest

from neurojepa_pl.synth.grids import MNI_SHAPE, grid_name, mni_affine, normalize_grid, voxel_volume_ml, world_to_voxel


def test_normalize_grid_accepts_names_strings_and_tuples():
    assert normalize_grid("MNI") == "mni"
    assert normalize_grid("model") == "model"
    assert normalize_grid("48x54x48") == (48, 54, 48)
    assert normalize_grid([48, 54, 48]) == (48, 54, 48)
    assert grid_name((48, 54, 48)) == "48x54x48"


@pytest.mark.parametrize("bad", ["fsl", "48x54", (4, 4, 4), (48, 54)])
def test_normalize_grid_rejects_bad_specs(bad):
    with pytest.raises(ValueError, match="grid"):
        normalize_grid(bad)


def test_mni_affine_is_the_fsl_box_written_ras():
    affine = mni_affine()
    assert np.array_equal(affine[:3, :3], np.eye(3))
    # Voxel (90, 126, 72) of the 182x218x182 FSL grid is the MNI origin; the far corner is (91, 91, 109) mm.
    assert np.allclose(world_to_voxel(affine, np.zeros(3)), (90, 126, 72))
    assert np.allclose(affine[:3, :3] @ (np.array(MNI_SHAPE) - 1) + affine[:3, 3], (91, 91, 109))
    assert voxel_volume_ml(affine) == pytest.approx(0.001)
