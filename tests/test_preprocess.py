"""Input normalisation: image modes, sizes, point and mask mapping."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from luciddrag.engine.errors import InputError
from luciddrag.engine.preprocess import load_mask, prepare, restore, scale_point, to_rgb, working_size
from luciddrag.engine.request import DragPair


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "LA", "1"])
def test_every_mode_becomes_rgb(mode):
    im = Image.new("RGB", (20, 12), (200, 30, 40)).convert(mode)
    rgb, alpha = to_rgb(im)
    assert rgb.mode == "RGB" and rgb.size == (20, 12)
    assert (alpha is not None) == (mode in ("RGBA", "LA"))


def test_16bit_range_is_stretched_not_clipped():
    arr = np.linspace(1000, 3000, 16 * 16).reshape(16, 16).astype(np.uint16)
    im = Image.fromarray(arr)
    assert im.mode.startswith("I")
    rgb, _ = to_rgb(im)
    g = np.asarray(rgb)[..., 0]
    assert g.min() == 0 and g.max() == 255


def test_working_size_keeps_aspect_and_multiple():
    w, h = working_size(1024, 512, native=512, multiple=64)
    assert (w % 64, h % 64) == (0, 0) and abs(w / h - 2) < 0.2 and abs(w * h - 512 * 512) / (512 * 512) < 0.15


def test_points_and_mask_map_consistently_through_resize():
    img = Image.new("RGB", (200, 100), "white")
    mask = np.zeros((100, 200), bool)
    mask[40:60, 140:160] = True  # a square around (150, 50)
    prep = prepare(img, [DragPair(handle=(150, 50), target=(50, 50))], mask, native=64, multiple=16)
    ww, wh = prep.working_size
    hx, hy = prep.drags[0].handle
    ys, xs = np.nonzero(prep.mask)
    # the mapped handle sits at the centre of the mapped mask square
    assert abs(xs.mean() - hx) < 1.0 and abs(ys.mean() - hy) < 1.0
    # and maps back to the original coordinate
    back = scale_point((hx, hy), (ww, wh), (200, 100))
    assert np.allclose(back, (150, 50), atol=1e-6)
    assert restore(prep.image, prep).size == (200, 100)


def test_rgba_mask_uses_alpha(tmp_path):
    m = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    m.putpixel((3, 4), (255, 255, 255, 255))
    arr = load_mask(m, (10, 10))
    assert arr.sum() == 1 and arr[4, 3]


def test_numpy_float_image_and_bad_shapes():
    prep = prepare(np.random.rand(32, 32, 3), [DragPair(handle=(1, 1), target=(5, 5))], None, 32, 16)
    assert prep.image.size == (32, 32)
    with pytest.raises(InputError, match="HxW"):
        prepare(np.zeros((32, 32, 5)), [DragPair(handle=(1, 1), target=(5, 5))], None, 32, 16)
