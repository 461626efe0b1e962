"""CamStore: round trip, completion marker, hash checks, id validation, layout on disk."""
import os
import uuid

import numpy as np
import pytest
import zarr

from storage.cam_store import FLOAT16_MANTISSA_BITS, CamStore, CamStoreError, error_bound, round_mantissa

CLASSES = ["background", "aeroplane", "bicycle", "bird"]


def cams(n=3, h=30, w=40, seed=0):
    """CAM-like planes in [0, 1] with about half exact zeros."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, h, w)).astype(np.float32)
    x[x < 0.5] = 0.0
    return x


@pytest.fixture(params=["local", "file", "memory"])
def url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run" / "cams.zarr")
    if request.param == "file":
        return f"file://{tmp_path}/run/cams.zarr"
    return f"memory://cam-store-test-{uuid.uuid4().hex}/cams.zarr"


def make(url, **kw):
    """A store of plain float16 values unless ``mantissa_bits`` says otherwise."""
    kw.setdefault("mantissa_bits", FLOAT16_MANTISSA_BITS)
    return CamStore.create(url, kw.pop("config_hash", "cfg1"), kw.pop("checkpoint_hash", "ck1"), CLASSES, **kw)


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3")
@pytest.mark.parametrize("compressor", ["delta-blosc-zstd", "blosc-zstd", "blosc-lz4", "zstd", "none"])
@pytest.mark.parametrize("bits", [FLOAT16_MANTISSA_BITS, 8])
def test_round_trip(url, compressor, bits):
    store = make(url, compressor=compressor, mantissa_bits=bits)
    keys = np.array([0, 2, 3])
    p, k = cams(seed=1), cams(seed=2) * 2.0
    store.write("2007_000032", keys, p, k)
    got_keys, got_p, got_k = CamStore.open(url).load("2007_000032")
    assert got_keys.dtype == np.int64 and got_keys.tolist() == [0, 2, 3]
    assert got_p.dtype == np.float32 and got_k.dtype == np.float32 and got_p.shape == (3, 30, 40)
    # float16 rounds to 2**-11 relative, the kept mantissa bits add 2**-(bits + 1)
    bound = 2.0 ** -11 + (2.0 ** -(bits + 1) if bits < FLOAT16_MANTISSA_BITS else 0)
    for got, want in ((got_p, p), (got_k, k)):
        assert (np.abs(got - want) <= bound * 1.001 * np.abs(want)).all()
    assert (got_p[p == 0] == 0).all()
    array = zarr.open_group(url, mode="r", use_consolidated=False,
                            storage_options={"auto_mkdir": True} if url.startswith("file://") else None)["2007_000032"]
    # delta formats keep float16 bit patterns as int16 (the delta of neighbouring patterns is exact)
    assert array.shape == (2, 3, 30, 40) and array.dtype == (np.int16 if compressor.startswith("delta") else np.float16)
    if bits == FLOAT16_MANTISSA_BITS:  # nothing but float16's own rounding
        assert np.array_equal(got_p, p.astype(np.float16).astype(np.float32))
    assert array.chunks == (1, 1, 30, 40) and array.shards == (2, 3, 30, 40)
    assert array.attrs["keys"] == [0, 2, 3] and array.attrs["size"] == [30, 40] and array.attrs["complete"] is True
    assert store.ids() == ["2007_000032"] and len(store) == 1 and "2007_000032" in store and "other" not in store


def test_round_mantissa_rounds_to_nearest_with_the_kept_bits():
    values = np.array([1.0, 1 + 2 ** -10, 1 + 3 * 2 ** -10, 1 + 2 ** -9, -1.5 - 2 ** -10, -1.5 - 2 ** -9, 0.0],
                      dtype=np.float16)
    rounded = round_mantissa(values, 8)
    # 8 bits: steps of 2**-8 in [1, 2), to the nearest; halfway cases go away from zero
    assert rounded.tolist() == [1.0, 1.0, 1 + 2 ** -8, 1 + 2 ** -8, -1.5, -1.5 - 2 ** -8, 0.0]
    assert np.isinf(round_mantissa(np.float16([65504.0]), 8)).all()  # float16's maximum rounds up out of range
    assert round_mantissa(values, FLOAT16_MANTISSA_BITS) is values
    kept = round_mantissa(np.float16([1 + 2 ** -9]), 9).view(np.uint16)
    assert int(kept[0]) & 1 == 0  # the dropped bit is cleared
    with pytest.raises(CamStoreError, match="mantissa_bits"):
        round_mantissa(values, 0)
    with pytest.raises(CamStoreError, match="mantissa_bits"):
        make("memory://bad-bits/cams.zarr", mantissa_bits=11)


@pytest.mark.parametrize("bits", [10, 8, 5])
def test_stored_values_stay_within_the_error_bound_subnormals_included(bits):
    x = np.concatenate([np.geomspace(1e-8, 2.0, 20000), -np.geomspace(1e-8, 2.0, 20000)]).astype(np.float32)
    stored = round_mantissa(x.astype(np.float16), bits).astype(np.float32)
    relative, absolute = error_bound(bits)
    assert (np.abs(stored - x) <= relative * np.abs(x) + absolute).all()
    assert absolute < 1e-6 and relative < 2.0 ** -bits  # a bound that says something


def test_attrs_and_ids(url):
    store = make(url)
    assert store.attrs == {"config_hash": "cfg1", "checkpoint_hash": "ck1", "class_names": CLASSES}
    assert (store.config_hash, store.checkpoint_hash, store.class_names) == ("cfg1", "ck1", CLASSES)
    for image_id in ["COCO_train2014_000000000009", "2007_000032", "a.b-c"]:
        store.write(image_id, np.array([0, 1]), cams(2), cams(2))
    reopened = CamStore.open(url, config_hash="cfg1", checkpoint_hash="ck1")
    assert reopened.ids() == ["2007_000032", "COCO_train2014_000000000009", "a.b-c"]
    assert reopened.completed_ids() == set(reopened.ids()) and len(reopened) == 3


def test_fused(url):
    store = make(url)
    p, k = cams(seed=3), cams(seed=4)
    store.write("img", np.array([0, 1, 2]), p, k)
    keys, fused = store.fused("img", 0.3)
    _, p16, k16 = store.load("img")
    assert keys.tolist() == [0, 1, 2] and fused.dtype == np.float32
    np.testing.assert_allclose(fused, k16 + 0.3 * p16, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fused, k + 0.3 * p, atol=2e-3)


def test_interrupted_write_is_incomplete(url, monkeypatch):
    store = make(url)
    store.write("done", np.array([0, 1]), cams(2), cams(2))
    store.write("crash", np.array([0, 1]), cams(2), cams(2))  # complete at first, then rewritten and interrupted
    original = zarr.Array.update_attributes

    def crash_before_marker(self, new_attributes):
        if new_attributes.get("complete") is True:
            raise RuntimeError("killed")
        return original(self, new_attributes)

    monkeypatch.setattr(zarr.Array, "update_attributes", crash_before_marker)
    with pytest.raises(RuntimeError, match="killed"):
        store.write("crash", np.array([0, 2, 3]), cams(3), cams(3))
    monkeypatch.undo()

    assert not store.is_complete("crash") and store.is_complete("done")
    assert "crash" not in store
    assert store.completed_ids() == {"done"} and store.ids() == ["done"] and len(store) == 1
    with pytest.raises(CamStoreError, match=r"crash.*incomplete") as err:
        CamStore.open(url).load("crash")
    assert url in str(err.value)
    with pytest.raises(CamStoreError, match="crash"):
        store.fused("crash", 1.0)

    store.write("crash", np.array([0, 3]), cams(2, seed=5), cams(2, seed=6))  # the rerun completes it
    keys, p, _ = store.load("crash")
    assert keys.tolist() == [0, 3] and np.abs(p - cams(2, seed=5)).max() <= 1e-3


def test_missing_image(url):
    store = make(url)
    assert not store.is_complete("nope")
    with pytest.raises(CamStoreError, match="nope") as err:
        store.load("nope")
    assert url in str(err.value)


def test_rewrite_overwrites(url):
    store = make(url)
    store.write("img", np.array([0, 1, 2]), cams(3, seed=1), cams(3, seed=2))
    store.write("img", np.array([0, 4]), cams(2, 20, 10, seed=7), cams(2, 20, 10, seed=8))
    keys, p, k = store.load("img")
    assert keys.tolist() == [0, 4] and p.shape == k.shape == (2, 20, 10)
    assert np.abs(k - cams(2, 20, 10, seed=8)).max() <= 1e-3
    assert store.ids() == ["img"]


def test_create_checks_existing_store(url):
    make(url).write("img", np.array([0]), cams(1), cams(1))
    again = make(url)  # same hashes: reopened, nothing wiped
    assert again.ids() == ["img"]
    with pytest.raises(CamStoreError) as err:
        make(url, config_hash="cfg2")
    message = str(err.value)
    assert url in message and "config cfg1 / checkpoint ck1" in message and "config cfg2 / checkpoint ck1" in message
    with pytest.raises(CamStoreError, match="checkpoint ck2"):
        make(url, checkpoint_hash="ck2")
    with pytest.raises(CamStoreError, match="classes"):
        CamStore.create(url, "cfg1", "ck1", CLASSES[:2])
    with pytest.raises(CamStoreError, match="config cfg1 / checkpoint ck1"):
        CamStore.open(url, config_hash="other")
    with pytest.raises(CamStoreError, match="checkpoint ck1"):
        CamStore.open(url, checkpoint_hash="other")
    assert CamStore.open(url).ids() == ["img"]


def test_open_rejects_non_cam_stores(tmp_path):
    missing = str(tmp_path / "missing.zarr")
    with pytest.raises(CamStoreError, match="not a CAM store") as err:
        CamStore.open(missing)
    assert missing in str(err.value)

    random_dir = tmp_path / "random"
    random_dir.mkdir()
    (random_dir / "notes.txt").write_text("hello")
    for target in (str(random_dir), f"file://{random_dir}"):
        with pytest.raises(CamStoreError, match="not a CAM store"):
            CamStore.open(target)
    with pytest.raises(CamStoreError, match="not a CAM store"):
        make(str(random_dir))  # create() never writes into a foreign directory
    assert os.listdir(random_dir) == ["notes.txt"]

    plain = str(tmp_path / "plain.zarr")
    zarr.open_group(plain, mode="a", attributes={"config_hash": "cfg1"})
    with pytest.raises(CamStoreError, match="not a CAM store") as err:
        CamStore.open(plain)
    assert plain in str(err.value)
    with pytest.raises(CamStoreError, match="not a CAM store"):
        make(plain)

    with pytest.raises(CamStoreError, match="not a CAM store"):
        CamStore.open(f"memory://cam-store-test-{uuid.uuid4().hex}/none.zarr")


def test_bad_inputs(url):
    store = make(url)
    for bad in ["a/b", "", "..", ".", "img id", "__meta", "zarr.json", "x\\y"]:
        with pytest.raises(CamStoreError, match="invalid image id"):
            store.write(bad, np.array([0]), cams(1), cams(1))
        assert bad not in store
    with pytest.raises(CamStoreError, match="invalid image id"):
        store.load("../escape")
    with pytest.raises(CamStoreError, match="len\\(keys\\)"):
        store.write("img", np.array([0, 1]), cams(3), cams(3))
    with pytest.raises(CamStoreError, match="keys"):
        store.write("img", np.array([0.0]), cams(1), cams(1))
    with pytest.raises(CamStoreError, match="finite"):
        store.write("img", np.array([0]), np.full((1, 2, 2), np.nan), np.zeros((1, 2, 2)))
    with pytest.raises(CamStoreError, match="compressor"):
        make(url, compressor="gzip")
    store.write("img", np.array([0]), cams(1), cams(1))
    with pytest.raises(CamStoreError, match="read-only"):
        CamStore.open(url).write("img2", np.array([0]), cams(1), cams(1))
    assert store.ids() == ["img"]


def test_one_shard_file_per_image(tmp_path):
    root = tmp_path / "cams.zarr"
    store = CamStore.create(str(root), "cfg1", "ck1", CLASSES)
    store.write("2007_000032", np.array([0, 1, 2, 3]), cams(4, seed=1), cams(4, seed=2))
    store.write("2007_000039", np.array([0, 1]), cams(2, seed=3), cams(2, seed=4))
    for image_id in ("2007_000032", "2007_000039"):
        files = [os.path.relpath(os.path.join(d, f), root / image_id)
                 for d, _, names in os.walk(root / image_id) for f in names]
        assert sorted(files) == [os.path.join("c", "0", "0", "0", "0"), "zarr.json"], files
    # all-zero images cost no shard file at all but still load as zeros
    store.write("empty", np.array([0]), np.zeros((1, 5, 5)), np.zeros((1, 5, 5)))
    assert os.listdir(root / "empty") == ["zarr.json"]
    keys, p, k = store.load("empty")
    assert keys.tolist() == [0] and not p.any() and not k.any()


def test_damaged_chunk_is_a_clear_error_naming_the_image(tmp_path):
    url = str(tmp_path / "cams.zarr")
    make(url).write("img_a", np.array([0, 1]), cams(2), cams(2, seed=3))
    shards = [p for p in (tmp_path / "cams.zarr" / "img_a").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert shards
    for shard in shards:
        shard.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(CamStoreError, match=r"image 'img_a' .*unreadable data.*rerun CAM inference"):
        CamStore.open(url).load("img_a")
