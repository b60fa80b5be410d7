"""FID/KID through torchmetrics with an injected feature extractor, and reference folders."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from t2ilab.metrics import fid_kid, fid_kid_from_folder, load_image_folder
from t2ilab.metrics.images import tensor_to_pil


def _numpy_fid(f_real: np.ndarray, f_fake: np.ndarray) -> float:
    mu1, mu2 = f_real.mean(0), f_fake.mean(0)
    s1, s2 = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_numpy_on_the_extractor_features(tiny_features, red_squares, blue_noise):
    g = torch.Generator().manual_seed(0)
    # a little noise in every channel keeps the feature covariances full rank for scipy's sqrtm
    real = (red_squares(20, seed=0) + 0.1 * torch.rand(20, 3, 32, 32, generator=g)).clamp(0, 1)
    fake = torch.cat([red_squares(10, seed=7), blue_noise(10)])
    fake = (fake + 0.1 * torch.rand(20, 3, 32, 32, generator=g)).clamp(0, 1)
    out = fid_kid(real, fake, feature=tiny_features, kid_subsets=5, batch_size=7)
    # torchmetrics hands a custom module the float [0, 1] images unchanged (normalize=True)
    assert tiny_features.seen_dtypes == {torch.float32}
    with torch.no_grad():
        f_real = tiny_features(real).double().numpy()
        f_fake = tiny_features(fake).double().numpy()
    assert out["fid"] == pytest.approx(_numpy_fid(f_real, f_fake), rel=1e-3, abs=1e-4)


def test_identical_sets_score_zero_and_different_sets_do_not(
    tiny_features, red_squares, blue_noise
):
    red, blue = red_squares(20, seed=0), blue_noise(20)
    same = fid_kid(red, red.clone(), feature=tiny_features)
    other = fid_kid(red, blue, feature=tiny_features)
    assert set(same) == {"fid", "kid", "kid_std"}
    assert abs(same["fid"]) < 1e-3
    assert other["fid"] > 0.1 and other["fid"] > 1000 * abs(same["fid"])
    assert other["kid"] > 0.01 and other["kid"] > 100 * abs(same["kid"])


def test_kid_subset_size_is_clamped_and_seeded(tiny_features, red_squares, blue_noise):
    real, fake = red_squares(7, seed=0), blue_noise(5)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    # subset_size 1000 > 5 images would make torchmetrics raise; it is clamped instead
    a = fid_kid(real, fake, feature=tiny_features, kid_subsets=10, seed=3)
    after = torch.rand(1)
    b = fid_kid(real, fake, feature=tiny_features, kid_subsets=10, seed=3)
    assert a == b  # KID subsets come from a seeded, forked RNG
    assert torch.equal(before, after)  # the caller's RNG stream is untouched
    assert a["kid_std"] > 0  # 7 real images give differing subsets of 5


def test_too_few_images_raise(tiny_features, red_squares):
    with pytest.raises(ValueError, match="generated image set has 1 image"):
        fid_kid(red_squares(3), red_squares(1), feature=tiny_features)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch_fidelity") is not None,
    reason="torch-fidelity installed",
)
def test_inception_without_torch_fidelity_is_a_clear_error(red_squares):
    with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
        fid_kid(red_squares(2), red_squares(2), feature=2048)


def _write(folder, images, ext):
    folder.mkdir(exist_ok=True)
    for k, img in enumerate(images):
        tensor_to_pil(img).save(folder / f"{k:02d}.{ext}")


def test_fid_from_folder_identical_and_different(tmp_path, tiny_features, red_squares, blue_noise):
    red = red_squares(8, size=40)
    _write(tmp_path / "ref", red, "png")
    (tmp_path / "ref" / "notes.txt").write_text("not an image")
    generated = [tensor_to_pil(img) for img in red]
    same = fid_kid_from_folder(tmp_path / "ref", generated, size=32, feature=tiny_features)
    other = fid_kid_from_folder(
        tmp_path / "ref", blue_noise(8, size=48), size=32, feature=tiny_features
    )
    assert abs(same["fid"]) < 1e-3
    assert other["fid"] > 1000 * max(abs(same["fid"]), 1e-6)


def test_reference_folder_errors_name_the_folder(tmp_path, tiny_features, red_squares):
    empty = tmp_path / "empty_ref"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    for folder, count in ((empty, 0), (tmp_path / "one_ref", 1)):
        if count:
            _write(folder, red_squares(count), "png")
        with pytest.raises(ValueError) as err:
            fid_kid_from_folder(folder, red_squares(4), size=32, feature=tiny_features)
        msg = str(err.value)
        assert "\n" not in msg and f"'{folder}'" in msg and "at least 2" in msg
    with pytest.raises(ValueError, match="contains no jpg/png/webp images"):
        load_image_folder(empty)
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="generated image set has 0"):
        _write(tmp_path / "ok_ref", red_squares(3), "png")
        fid_kid_from_folder(tmp_path / "ok_ref", [], size=32, feature=tiny_features)


def test_load_image_folder_formats_modes_and_exif(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    # 40 wide x 20 high: left half red, right half blue
    landscape = Image.new("RGB", (40, 20), (0, 0, 255))
    landscape.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    landscape.save(folder / "a_rotated.jpg", exif=exif, quality=95)
    Image.new("RGBA", (20, 40), (0, 255, 0, 255)).save(folder / "b_rgba.png")
    Image.new("L", (20, 40), 128).save(folder / "c_gray.webp", lossless=True)
    Image.new("RGB", (20, 40), (9, 9, 9)).save(folder / "d_upper.PNG")

    images = load_image_folder(folder)
    assert images.shape == (4, 3, 40, 20)  # the EXIF rotation made the JPEG portrait
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    top, bottom = images[0, :, 5, 10], images[0, :, 35, 10]
    assert top[0] > 0.8 and top[2] < 0.2  # red half rotated to the top
    assert bottom[2] > 0.8 and bottom[0] < 0.2
    torch.testing.assert_close(images[1, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(images[2, :, 0, 0], torch.full((3,), 128 / 255))

    squares = load_image_folder(folder, size=16)
    assert squares.shape == (4, 3, 16, 16)
