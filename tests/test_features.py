"""Feature cache: content-hash keys, bad images, resuming an interrupted build."""
import shutil

import numpy as np
import pytest
import torch
from conftest import bad_images, photo

from vlfuse.data.images import load_image
from vlfuse.errors import DataError
from vlfuse.registry import VISION_ENCODERS
from vlfuse.training.features import FeatureCache


class CountingEncoder(torch.nn.Module):
    """Wraps an encoder and counts the images its stem sees (to tell cache hits from misses)."""

    def __init__(self, inner, fail_after=None):
        super().__init__()
        self.inner, self.seen, self.fail_after = inner, 0, fail_after
        self.transform, self.cache_key = inner.transform, inner.cache_key

    def stem(self, pixels):
        if self.fail_after is not None and self.seen >= self.fail_after:
            raise KeyboardInterrupt  # the user pressed Ctrl-C in the middle of the build
        self.seen += len(pixels)
        return self.inner.stem(pixels)

    def stem_chunked(self, pixels):
        return torch.cat([self.stem(c) for c in pixels.split(self.inner.cpu_inference_chunk)])


def encoder(size=32, **kw):
    return CountingEncoder(VISION_ENCODERS.build("small-cnn", image_size=size), **kw)


@pytest.fixture
def photos(tmp_path):
    return [photo(tmp_path / f"p{i}.jpg", seed=i) for i in range(5)]


def test_entries_hold_stem_outputs(tmp_path, photos):
    enc = encoder()
    digests, failures = FeatureCache(tmp_path / "cache", enc).build(photos, progress=False)
    assert failures == [] and enc.seen == 5 and len(set(digests)) == 5
    feats = FeatureCache(tmp_path / "cache", enc).load(digests)
    assert feats.dtype == torch.float16 and feats.shape == (5, 3, 32, 32)
    expected = enc.transform(load_image(photos[2])).half()
    assert torch.allclose(feats[2].float(), expected.float(), atol=1e-3)


def test_renamed_file_hits_and_edited_file_misses(tmp_path, photos):
    root = tmp_path / "cache"
    first, _ = FeatureCache(root, encoder()).build(photos, progress=False)
    renamed = photos[0].with_name("renamed.jpg")
    shutil.move(photos[0], renamed)
    photo(photos[1], seed=99)  # same name, new content
    enc = encoder()
    second, _ = FeatureCache(root, enc).build([renamed, *photos[1:]], progress=False)
    assert second[0] == first[0] and second[2:] == first[2:]
    assert second[1] != first[1]
    assert enc.seen == 1  # only the edited image went through the CNN
    # another encoder configuration (input size) never reuses these entries
    other = encoder(size=48)
    FeatureCache(root, other).build(photos[2:], progress=False)
    assert other.seen == 3


def test_bad_images_are_listed_and_the_rest_cached(tmp_path, photos):
    bad = bad_images(tmp_path / "bad")
    paths = [photos[0], *bad.values(), tmp_path / "missing.jpg", photos[1]]
    digests, failures = FeatureCache(tmp_path / "cache", encoder()).build(paths, progress=False)
    assert digests[0] and digests[-1]
    assert digests[1:-1] == [None] * 5
    named = {path for path, _ in failures}
    assert named == {str(p) for p in [*bad.values(), tmp_path / "missing.jpg"]}
    assert any("does not exist" in e or "cannot be read" in e for p, e in failures if p.endswith("missing.jpg"))
    assert FeatureCache(tmp_path / "cache", encoder()).load([digests[0], digests[-1]]).shape[0] == 2
    # features(): build + load in one, with the indices kept; none readable is a clear error
    feats, kept, failures = FeatureCache(tmp_path / "cache", encoder()).features(paths, progress=False)
    assert kept == [0, len(paths) - 1] and feats.shape[0] == 2 and len(failures) == 5
    with pytest.raises(DataError, match="none of the 5 images"):
        FeatureCache(tmp_path / "cache", encoder()).features(paths[1:-1], progress=False)


def test_interrupted_build_resumes(tmp_path, photos):
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(root, encoder(fail_after=2)).build(photos, batch_size=2, progress=False)
    written = list(root.rglob("*.npy"))
    assert len(written) == 2 and not list(root.rglob("*.tmp*"))
    enc = encoder()
    digests, failures = FeatureCache(root, enc).build(photos, batch_size=2, progress=False)
    assert enc.seen == 3 and failures == [] and all(digests)
    assert np.load(written[0]).dtype == np.float16


def test_mirrored_cache_holds_the_mirror_images_stem_outputs(tmp_path, photos):
    enc = encoder()
    plain, _ = FeatureCache(tmp_path / "cache", enc).build(photos[:2], progress=False)
    mirrored = FeatureCache(tmp_path / "cache", enc, mirrored=True)
    digests, failures = mirrored.build(photos[:2], progress=False)
    assert failures == [] and digests == plain and enc.seen == 4  # same keys, a folder of its own
    feats = mirrored.load(digests)
    expected = enc.transform(load_image(photos[1])).flip(-1)  # small-cnn's stem is the identity
    assert torch.allclose(feats[1].float(), expected, atol=1e-3)
    assert not torch.allclose(feats[1].float(), FeatureCache(tmp_path / "cache", enc).load(plain)[1].float())


def test_image_transform_normalises_like_the_numpy_formula(tmp_path):
    """The transform's torch arithmetic gives (uint8 / 255 - mean) / std exactly as float32 NumPy computes it."""
    from PIL import Image

    from vlfuse.data.images import ImageTransform

    tf = ImageTransform(size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    image = load_image(photo(tmp_path / "a.jpg", size=(120, 90)))
    arr = np.asarray(image.resize((64, 64), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    want = ((arr - np.asarray(tf.mean, np.float32)) / np.asarray(tf.std, np.float32)).transpose(2, 0, 1)
    got = tf(image)
    assert got.shape == (3, 64, 64) and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(want)))
