"""Data layer: offline TFDS builders (no TensorFlow), sources, transforms, iterators."""

import collections
import hashlib
import io
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from ldm_jax.data import TrainIterator, default_config, eval_batches, open_source, transforms
from ldm_jax.data.builders import digits, photo_crops
from ldm_jax.data.prepare import main as prepare_main
from ldm_jax.errors import DatasetNotPreparedError, UserError


def _digits_cfg(data_dir, **kw):
    kw = {"crop": "center", "flip": False, "num_threads": 4, **kw}
    return default_config(name="digits", data_dir=data_dir, image_size=32, **kw)


def _photo_cfg(data_dir, **kw):
    kw = {"crop": "random", "flip": True, "image_size": 48, "num_threads": 4, **kw}
    return default_config(name="photo_crops", data_dir=data_dir, **kw)


def _hash(array) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


# ---------------------------------------------------------------------------- builders


def test_builds_and_reads_without_tensorflow(data_dir):
    src = open_source("digits", "train", data_dir)
    assert isinstance(src[0]["image"], np.ndarray)
    # tfds' own entry point reads the registered builder too.
    ds = tfds.data_source("photo_crops", split="test", data_dir=data_dir, download=False)
    assert ds[0]["image"].dtype == np.uint8
    assert "tensorflow" not in sys.modules


def test_digits_counts_shapes_and_captions(data_dir):
    train, test = (open_source("digits", s, data_dir) for s in ("train", "test"))
    assert len(train) + len(test) == 1797
    assert 0.14 < len(test) / 1797 < 0.16
    labels = []
    for i in range(len(test)):
        ex = test[i]
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
        assert isinstance(ex["label"], (int, np.integer)) and isinstance(ex["caption"], str)
        assert digits.CLASS_NAMES[ex["label"]] in ex["caption"].split()
        np.testing.assert_array_equal(ex["image"][..., 0], ex["image"][..., 2])  # grey as RGB
        labels.append(ex["label"])
    # Stratified: ranks r with r % 20 >= 17 of every class, i.e. ~15% of each.
    per_class = np.bincount(load_digits().target)
    want = [c // 20 * 3 + max(0, c % 20 - 17) for c in per_class]
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), want)


def test_digits_test_split_is_the_sklearn_images(data_dir):
    data = load_digits()
    idx = digits.split_indices(data.target)["test"]
    expected = sorted(_hash(digits.digit_image(data.images[i])) for i in idx)
    src = open_source("digits", "test", data_dir)
    assert sorted(_hash(src[i]["image"]) for i in range(len(src))) == expected


def test_photo_crops_counts_and_disjoint_sources(data_dir):
    train, test = (open_source("photo_crops", s, data_dir) for s in ("train", "test"))
    assert len(train) == len(photo_crops.TRAIN_PHOTOS) * photo_crops.CROPS_PER_TRAIN_PHOTO
    assert len(test) == len(photo_crops.TEST_PHOTOS) * photo_crops.CROPS_PER_TEST_PHOTO
    assert not set(photo_crops.TRAIN_PHOTOS) & set(photo_crops.TEST_PHOTOS)
    test_sources = collections.Counter(test[i]["source"] for i in range(len(test)))
    assert test_sources == {n: photo_crops.CROPS_PER_TEST_PHOTO for n in photo_crops.TEST_PHOTOS}
    train_sources = {train[i]["source"] for i in range(0, len(train), 7)}
    assert train_sources == set(photo_crops.TRAIN_PHOTOS)
    ex = train[0]
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    assert ex["image"].std() > 1.0


def test_builds_are_deterministic(data_dir, tmp_path):
    # A second digits build (through prepare_if_missing) must give identical records.
    other = str(tmp_path)
    assert len(open_source("digits", "test", other, prepare_if_missing=True)) == 261
    for split in ("train", "test"):
        name = f"digits/1.0.0/digits-{split}.array_record-00000-of-00001"
        with open(f"{data_dir}/{name}", "rb") as a, open(f"{other}/{name}", "rb") as b:
            assert a.read() == b.read()
    # photo_crops: regenerating the test split from code gives the stored images.
    builder = photo_crops.PhotoCrops(data_dir=other)
    gen = builder._generate_examples(photo_crops.TEST_PHOTOS, photo_crops.CROPS_PER_TEST_PHOTO)
    regenerated = sorted(_hash(np.asarray(Image.open(io.BytesIO(ex["image"])))) for _, ex in gen)
    src = open_source("photo_crops", "test", data_dir)
    assert sorted(_hash(src[i]["image"]) for i in range(len(src))) == regenerated


# ---------------------------------------------------------------------------- sources


class LdmTestCaptions(tfds.core.GeneratorBasedBuilder):
    """Stand-in for a user-prepared TFDS dataset such as coco_captions."""

    VERSION = tfds.core.Version("0.1.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self):
        captions = tfds.features.Sequence({"text": tfds.features.Text()})
        image = tfds.features.Image(shape=(None, None, 1))
        features = tfds.features.FeaturesDict({"image": image, "captions": captions})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i in range(12):
            grey = np.full((20 + 3 * i, 40 - i, 1), 10 * i, np.uint8)
            buf = io.BytesIO()
            Image.fromarray(grey[..., 0]).save(buf, format="PNG")
            texts = [f"caption {i} {j}" for j in range(1 + i % 3)]
            yield i, {"image": buf.getvalue(), "captions": {"text": texts}}


def test_user_prepared_dataset_with_nested_captions(tmp_path):
    data_dir = str(tmp_path)
    LdmTestCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()
    src = open_source("ldm_test_captions", "validation", data_dir)
    assert src.has_feature("captions/text") and not src.has_feature("label")
    cfg = default_config(
        name="ldm_test_captions", data_dir=data_dir, train_split="validation", image_size=24,
        resize=28, caption_key="captions/text",
    )  # fmt: skip
    batch = next(TrainIterator(cfg, global_batch_size=12, seed=0, process_count=1))
    assert set(batch) == {"image", "caption"} and batch["image"].shape == (12, 24, 24, 3)
    for image, caption in zip(batch["image"], batch["caption"]):
        i = int(caption.split()[1])
        np.testing.assert_allclose(image, 10 * i / 127.5 - 1, atol=1e-6)  # grey level kept
    evals = next(eval_batches(cfg, global_batch_size=12, process_count=1, split="validation"))
    assert sorted(evals["caption"]) == sorted(f"caption {i} 0" for i in range(12))
    assert "tensorflow" not in sys.modules


def test_missing_dataset_error_names_dataset_dir_and_command(tmp_path):
    empty = str(tmp_path / "nothing_here")
    with pytest.raises(DatasetNotPreparedError) as err:
        open_source("digits", "train", empty)
    msg = str(err.value)
    assert "'digits'" in msg and empty in msg
    assert f"python -m ldm_jax.data.prepare --dataset digits --data_dir {empty}" in msg
    with pytest.raises(DatasetNotPreparedError) as err:
        open_source("celeb_a_hq/256", "train", empty)
    msg = str(err.value)
    assert "celeb_a_hq/256" in msg and empty in msg
    assert f"tfds build celeb_a_hq/256 --data_dir {empty} --file_format=array_record" in msg
    assert "tensorflow" not in sys.modules


def test_unknown_split_lists_available(data_dir):
    with pytest.raises(UserError, match=r"validation.*available splits: test, train"):
        open_source("digits", "validation", data_dir)
    assert len(open_source("digits", "train[:100]+test", data_dir)) == 361


def test_default_data_dir_follows_env(data_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    assert open_source("digits", "test").data_dir == data_dir


def test_prepare_cli_reports_counts(data_dir, capsys):
    assert prepare_main(["--dataset", "digits", "--data_dir", data_dir]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "train=1536" in out and "test=261" in out and data_dir in out


# ---------------------------------------------------------------------------- iterators


def _expected_digits_batch(src, seed, step, batch):
    """The contract written out: positions [step*B, (step+1)*B) of the epoch permutations."""
    rows, perms = [], {}
    for g in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(g, len(src))
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, 0, epoch]).permutation(len(src))
        perm = perms[epoch]
        rows.append(transforms.to_float(src[int(perm[offset])]["image"]))
    return np.stack(rows)


def test_train_batches_follow_the_permutation_contract_across_epochs(data_dir):
    src = open_source("digits", "train", data_dir)
    it = TrainIterator(_digits_cfg(data_dir), global_batch_size=500, seed=3, process_count=1)
    batches = [next(it) for _ in range(4)]  # batch 3 straddles epochs 0 and 1 (n = 1536)
    for step in (0, 3):
        np.testing.assert_array_equal(
            batches[step]["image"], _expected_digits_batch(src, 3, step, 500)
        )
    b = batches[0]
    assert b["image"].shape == (500, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["caption"].dtype == object
    for label, caption in zip(b["label"], b["caption"]):
        assert digits.CLASS_NAMES[label] in caption
    perm0, perm1 = (np.random.default_rng([3, 0, e]).permutation(len(src)) for e in (0, 1))
    assert not np.array_equal(perm0, perm1)  # epochs reshuffle


def test_global_batch_independent_of_process_count(data_dir):
    cfg = _photo_cfg(data_dir)  # random crops + flips: per-example rngs must agree too
    one = TrainIterator(cfg, global_batch_size=8, seed=1, process_index=0, process_count=1)
    two = [
        TrainIterator(cfg, global_batch_size=8, seed=1, process_index=p, process_count=2)
        for p in (0, 1)
    ]
    for _ in range(3):
        whole = next(one)
        halves = [next(it) for it in two]
        assert halves[0]["image"].shape == (4, 48, 48, 3)
        np.testing.assert_array_equal(whole["image"], np.concatenate([h["image"] for h in halves]))
        assert set(whole) == {"image"}  # photo_crops has neither labels nor captions
        assert -1.0 <= whole["image"].min() and whole["image"].max() <= 1.0


def test_resume_from_state_and_seeds(data_dir):
    cfg = _photo_cfg(data_dir, num_threads=0)
    it = TrainIterator(cfg, global_batch_size=6, seed=5, process_count=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert state["next_batch"] == 3
    expected = [next(it)["image"] for _ in range(2)]
    fresh = TrainIterator(cfg, global_batch_size=6, seed=5, process_count=1)
    fresh.set_state(dict(state))
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["image"], want)
    other = TrainIterator(cfg, global_batch_size=6, seed=6, process_count=1)
    assert not np.array_equal(next(other)["image"], expected[0])
    with pytest.raises(UserError, match="seed"):
        other.set_state(state)
    with pytest.raises(UserError, match=r"global_batch_size=6.*--config.batch_size=6"):
        TrainIterator(cfg, global_batch_size=4, seed=5, process_count=1).set_state(state)
    # A stream that never began (an imported run at step 0) takes any seed and batch size.
    unstarted = TrainIterator(cfg, global_batch_size=4, seed=9, process_count=1)
    unstarted.set_state({"next_batch": 0, "seed": 5, "global_batch_size": 6})
    first = next(unstarted)["image"]
    np.testing.assert_array_equal(
        first, next(TrainIterator(cfg, global_batch_size=4, seed=9, process_count=1))["image"]
    )


def test_worker_processes_give_the_threaded_stream(data_dir):
    """data.num_workers=2: batches made whole in two worker processes, read back in turn,
    are the threaded iterator's bit for bit (random crops and flips), also after
    set_state; a negative count is refused."""
    cfg = _photo_cfg(data_dir)
    threads = TrainIterator(cfg, global_batch_size=6, seed=2, process_count=1)
    want = [next(threads)["image"] for _ in range(5)]
    cfg.num_workers = 2
    workers = TrainIterator(cfg, global_batch_size=6, seed=2, process_count=1)
    try:
        for k, image in enumerate(want[:3]):
            np.testing.assert_array_equal(next(workers)["image"], image, err_msg=f"batch {k}")
        workers.set_state({"next_batch": 1, "seed": 2, "global_batch_size": 6})
        np.testing.assert_array_equal(next(workers)["image"], want[1])
        assert workers.get_state()["next_batch"] == 2
    finally:
        workers.close()
    cfg.num_workers = -1
    with pytest.raises(UserError, match="num_workers"):
        TrainIterator(cfg, global_batch_size=6, seed=2, process_count=1)


def test_batch_size_and_size_errors(data_dir):
    with pytest.raises(UserError, match=r"10.*3"):
        TrainIterator(
            _digits_cfg(data_dir), global_batch_size=10, seed=0, process_index=0, process_count=3
        )
    too_big = _photo_cfg(data_dir, image_size=80)
    it = TrainIterator(too_big, global_batch_size=2, seed=0, process_count=1)
    with pytest.raises(UserError, match=r"64x64.*data.resize=80"):
        next(it)
    resized = TrainIterator(
        _photo_cfg(data_dir, image_size=80, resize=96), global_batch_size=2, seed=0, process_count=1
    )
    assert next(resized)["image"].shape == (2, 80, 80, 3)


def test_eval_covers_each_example_once_with_padding(data_dir):
    cfg = _digits_cfg(data_dir, crop="random", flip=True)  # eval ignores both
    src = open_source("digits", "test", data_dir)
    per_process = [
        list(
            eval_batches(
                cfg, global_batch_size=16, num_examples=100, process_index=p, process_count=2
            )
        )
        for p in (0, 1)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 7  # ceil(100 / 16)
    real, labels = [], []
    for b0, b1 in zip(*per_process):
        batch = {k: np.concatenate([b0[k], b1[k]]) for k in b0}
        assert batch["image"].shape == (16, 32, 32, 3) and batch["mask"].dtype == bool
        real.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    real, labels = np.concatenate(real), np.concatenate(labels)
    want = np.stack([transforms.to_float(src[i]["image"]) for i in range(100)])
    np.testing.assert_array_equal(real, want)
    np.testing.assert_array_equal(labels, [src[i]["label"] for i in range(100)])
    total = sum(
        int(b["mask"].sum()) for b in eval_batches(cfg, global_batch_size=64, process_count=1)
    )
    assert total == len(src)


# ---------------------------------------------------------------------------- transforms


def test_transforms():
    img = np.arange(6 * 8, dtype=np.uint8).reshape(6, 8)  # greyscale
    crop = transforms.center_crop(img, 4)
    assert crop.shape == (4, 4, 3)
    np.testing.assert_array_equal(crop[..., 0], img[1:5, 2:6])
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    flipped = transforms.random_flip(
        transforms.random_flip(rgb, np.random.default_rng(1)), np.random.default_rng(1)
    )
    np.testing.assert_array_equal(flipped, rgb)
    flips = {transforms.random_flip(rgb, np.random.default_rng(s))[0, 0, 0] for s in range(20)}
    assert flips == {rgb[0, 0, 0], rgb[0, -1, 0]}
    a = transforms.random_crop(rgb, 5, np.random.default_rng(2))
    np.testing.assert_array_equal(a, transforms.random_crop(rgb, 5, np.random.default_rng(2)))
    f = transforms.to_float(np.array([0, 255, 128], np.uint8))
    assert f.dtype == np.float32 and f[0] == -1.0 and f[1] == 1.0 and abs(f[2]) < 0.01
    out = transforms.resize_smaller_side(np.full((40, 60, 1), 77, np.uint8), 20)
    assert out.shape == (20, 30, 3) and (out == 77).all()
    with pytest.raises(ValueError, match="5x5"):
        transforms.center_crop(np.zeros((5, 5, 3), np.uint8), 6)
