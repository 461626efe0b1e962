"""CAM storage benchmark: our Zarr CAM store (storage/cam_store.py) vs the reference implementation's format.

The reference writes one file per image with ``np.save(path, {"keys": keys, "IS_CAM": P, "IS_CAM1": K})`` (a
pickled dict holding two float32 (len(keys), H, W) arrays) and reads it back with
``np.load(path, allow_pickle=True).item()``. This benchmark writes the same deterministic CAM-like data in that
format and into a ``CamStore`` once per compressor the module supports, and measures in one run:

* bytes on disk (sum of the file sizes under each directory; allocated blocks reported too),
* write throughput (images/s and MB/s of float32 P + K payload; only the write calls are timed),
* read throughput (images/s, MB/s) and per-image read time (ms), reading every image once: ``np.load`` for the
  reference, a fresh ``CamStore.open`` (timed separately, and included in the totals) + ``CamStore.load`` for Zarr,
* round-trip error of the Zarr store (float16 on disk): max abs error on all stored values (which lie in [0, 2]),
  that error relative to the value range 2, and the max abs error on the P and K entries whose value is in [0, 1],
* content hashing of the store as the pipeline records and verifies it (``storage/digests.py``): seconds, ms per
  image, MB/s of on-disk bytes, and the verification time extrapolated to VOC train_aug (10,582 images),
* for context, the time of the refinement stage's dense CRF (pydensecrf, reference parameters, 10 iterations, run
  twice per image: fg and bg map) on a random 400 x 400 image with 3 labels, and read time / CRF time in %.

Targets: Zarr bytes <= 25 % of the reference bytes; max abs error <= 1e-3 on values in [0, 1]; per-image read
time < 5 % of the per-image CRF time.

Test data (seeded, generated one image at a time so memory stays small; the reference-format files, checked
bit-exact against a regeneration, are the inputs and originals of the Zarr runs): N images of H, W uniform in
[300, 500] with 1 + k channels (k uniform in 1..3); each channel is bilinearly upsampled low-res noise (a shared
component makes P and K correlated, plus a per-map one), ReLU'd after a shift that zeroes 40-60 % of the pixels,
max-normalised to [0, 1], then the fused-CAM background trick: channel 0 + 0.4, channels >= 1 x 2 (values in
[0, 2]).

Run from the repository root (needs only numpy, zarr, fsspec; pydensecrf optional)::

    python bench/cam_store.py                       # 200 images, results in bench/results/cam_store.json
    python bench/cam_store.py --images 50 --out /tmp/cam_store.json

Data is written under a temporary directory that is removed afterwards. Disk reads come from the page cache
(the files were just written), so read speeds are warm-cache speeds; the machine may be shared, so speeds are rough.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage import cam_store  # noqa: E402
from storage.cam_store import CamStore  # noqa: E402
from storage.digests import content_digests, damaged_units  # noqa: E402

BACKGROUND_OFFSET = 0.4  # as models/cam_inference.py (not imported: it needs torch)
BYTES_TARGET = 0.20  # of the float32 payload (the reference's .npy bytes less their headers)
CRF_RATIO_TARGET = 5.0  # percent
CLASS_NAMES = [f"class{i}" for i in range(20)]
VOC_TRAIN_AUG = 10582  # images whose CAMs the VOC pipeline stores (verification time extrapolated to them)


# ---------------------------------------------------------------------------------------------- test data
def _upsample(low: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (align_corners=False) upsampling of a 2-D array, as two interpolation matrices."""
    def matrix(n_out: int, n_in: int) -> np.ndarray:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = pos - lo
        mat = np.zeros((n_out, n_in))
        np.add.at(mat, (np.arange(n_out), lo), 1 - frac)
        np.add.at(mat, (np.arange(n_out), hi), frac)
        return mat
    return matrix(height, low.shape[0]) @ low @ matrix(width, low.shape[1]).T


def _channel(shared: np.ndarray, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One CAM channel in [0, 1] with 40-60 % exact zeros: ReLU of a shifted smooth field, max-normalised."""
    field = _upsample(shared + 0.6 * rng.standard_normal(shared.shape), height, width)
    # a little finer detail, like the sum of scales of a real multi-scale CAM
    fine = rng.standard_normal((max(2, height // 16), max(2, width // 16)))
    field += 0.25 * _upsample(fine, height, width)
    zero_fraction = rng.uniform(0.4, 0.6)
    field = np.maximum(field - np.quantile(field, zero_fraction), 0.0)
    return field / (field.max() + 1e-5)


def _image_rng(seed: int, index: int) -> tuple[np.random.Generator, int, int, int]:
    rng = np.random.default_rng([seed, index])
    height, width = (int(v) for v in rng.integers(300, 501, size=2))
    return rng, height, width, int(rng.integers(1, 4))


def image_shape(seed: int, index: int) -> tuple[int, int, int]:
    """(C, H, W) of image ``index`` without generating it."""
    _, height, width, k = _image_rng(seed, index)
    return 1 + k, height, width


def make_image(seed: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys int64 (C,), P float32 (C, H, W), K float32 (C, H, W)) of image ``index``; deterministic."""
    rng, height, width, k = _image_rng(seed, index)
    keys = np.concatenate([[0], np.sort(rng.choice(np.arange(1, 21), size=k, replace=False))]).astype(np.int64)
    maps = []
    for _ in range(2):  # P, K
        maps.append(np.empty((1 + k, height, width), dtype=np.float32))
    for c in range(1 + k):
        # shared low-res structure of this class (object layout): P and K differ but are correlated
        shared = rng.standard_normal((int(rng.integers(4, 9)), int(rng.integers(4, 9))))
        for m in maps:
            m[c] = _channel(shared, rng, height, width)
    for m in maps:  # background trick of fused CAMs: bg + 0.4, fg x 2
        m[0] += BACKGROUND_OFFSET
        m[1:] *= 2
    return keys, maps[0], maps[1]


# ---------------------------------------------------------------------------------------------- helpers
def dir_bytes(path: Path) -> tuple[int, int, int]:
    """(sum of file sizes, allocated bytes, file count) under ``path``."""
    size = blocks = count = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            size += st.st_size
            blocks += st.st_blocks * 512
            count += 1
    return size, blocks, count


def image_id(index: int) -> str:
    return f"2007_{index:06d}"


Source = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def generated(seed: int) -> Source:
    """The generated CAM-like images (:func:`make_image`)."""
    return lambda index: make_image(seed, index)


def stored(url: str, n_images: int | None) -> tuple[Source, int]:
    """The first ``n_images`` (all: None) images of a run's CAM store, e.g. trained CAMs."""
    store = CamStore.open(url)
    ids = store.ids()[:n_images]
    return (lambda index: store.load(ids[index])), len(ids)


class ErrorStats:
    def __init__(self, mantissa_bits: int = cam_store.FLOAT16_MANTISSA_BITS) -> None:
        self.bound, self.floor = cam_store.error_bound(mantissa_bits)
        self.within_bound = True
        self.max_all = 0.0
        self.max_unit = {"P": 0.0, "K": 0.0}
        self.keys_ok = True
        self.shape_ok = True

    def update(self, want: tuple, got: tuple) -> None:
        self.keys_ok &= np.array_equal(want[0], got[0])
        for name, a, b in (("P", want[1], got[1]), ("K", want[2], got[2])):
            if a.shape != b.shape:
                self.shape_ok = False
                continue
            err = np.abs(a - b)  # exact in float32: b is a rounded to float16 (Sterbenz)
            self.within_bound &= bool((err <= self.bound * np.abs(a) + self.floor).all())
            self.max_all = max(self.max_all, float(err.max()))
            unit = (a >= 0) & (a <= 1)
            if unit.any():
                self.max_unit[name] = max(self.max_unit[name], float(err[unit].max()))

    def as_dict(self) -> dict:
        unit = max(self.max_unit.values())
        return {"keys_equal": bool(self.keys_ok), "shapes_equal": bool(self.shape_ok),
                "max_abs_error": self.max_all, "max_abs_error_rel_range2": self.max_all / 2.0,
                "max_abs_error_values_in_0_1": {"P": self.max_unit["P"], "K": self.max_unit["K"], "max": unit},
                "relative_error_bound": self.bound, "absolute_error_floor": self.floor,
                "within_error_bound": self.within_bound,
                "pass_error": bool(self.keys_ok and self.shape_ok and self.within_bound)}


def throughput(n_images: int, payload: int, seconds: float) -> dict:
    return {"seconds": seconds, "images_per_s": n_images / seconds, "MB_per_s_f32_payload": payload / 1e6 / seconds,
            "ms_per_image": 1e3 * seconds / n_images}


# ---------------------------------------------------------------------------------------------- formats
def bench_reference(directory: Path, n_images: int, source: Source, payload: int) -> dict:
    """Writes the generated images in the reference format into ``directory`` (kept: the Zarr runs read their
    inputs and originals from it, so the data is generated only twice: to write, and to check this round trip)."""
    directory.mkdir()
    write_s = 0.0
    for i in range(n_images):
        keys, proto, cam = source(i)
        t0 = time.perf_counter()
        np.save(directory / f"{image_id(i)}.npy", {"keys": keys, "IS_CAM": proto, "IS_CAM1": cam})
        write_s += time.perf_counter() - t0
    size, allocated, files = dir_bytes(directory)
    read_s, per_image, errors = 0.0, [], ErrorStats()
    for i in range(n_images):
        t0 = time.perf_counter()
        d = np.load(directory / f"{image_id(i)}.npy", allow_pickle=True).item()
        got = (d["keys"], d["IS_CAM"], d["IS_CAM1"])
        dt = time.perf_counter() - t0
        read_s += dt
        per_image.append(dt)
        errors.update(source(i), got)
    return {"format": "reference np.save(dict) float32, one .npy per image",
            "bytes": size, "bytes_allocated": allocated, "files": files,
            "write": throughput(n_images, payload, write_s),
            "read": {**throughput(n_images, payload, read_s),
                     "ms_per_image_median": 1e3 * float(np.median(per_image))},
            "roundtrip": errors.as_dict()}


def read_reference(directory: Path, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = np.load(directory / f"{image_id(index)}.npy", allow_pickle=True).item()
    return d["keys"], d["IS_CAM"], d["IS_CAM1"]


def format_name(compressor: str, mantissa_bits: int) -> str:
    return compressor if mantissa_bits == cam_store.FLOAT16_MANTISSA_BITS else f"{compressor}/{mantissa_bits}-bit"


FORMATS = [(comp, cam_store.FLOAT16_MANTISSA_BITS) for comp in cam_store._COMPRESSORS] + [
    ("blosc-lz4", 8), ("blosc-zstd", 9), ("blosc-zstd", 8), ("blosc-zstd", 7), ("delta-blosc-zstd", 8)]
DEFAULT_FORMAT = (cam_store.DEFAULT_COMPRESSOR, cam_store.DEFAULT_MANTISSA_BITS)


def bench_zarr(root: Path, reference: Path, compressor: str, mantissa_bits: int, n_images: int,
               payload: int) -> dict:
    """Writes the images (read untimed from the verified reference files) into a fresh CamStore, then reads."""
    url = str(root / f"cams-{compressor}-{mantissa_bits}.zarr")
    write_s = 0.0
    t0 = time.perf_counter()
    store = CamStore.create(url, "bench-config", "bench-checkpoint", CLASS_NAMES, compressor=compressor,
                            mantissa_bits=mantissa_bits)
    create_s = time.perf_counter() - t0
    for i in range(n_images):
        keys, proto, cam = read_reference(reference, i)
        t0 = time.perf_counter()
        store.write(image_id(i), keys, proto, cam)
        write_s += time.perf_counter() - t0
    del store
    size, allocated, files = dir_bytes(Path(url))
    t0 = time.perf_counter()
    store = CamStore.open(url, "bench-config", "bench-checkpoint")  # fresh open, as the refinement stage does
    open_s = time.perf_counter() - t0
    read_s, per_image, errors = 0.0, [], ErrorStats(mantissa_bits)
    for i in range(n_images):
        t0 = time.perf_counter()
        got = store.load(image_id(i))
        dt = time.perf_counter() - t0
        read_s += dt
        per_image.append(dt)
        errors.update(read_reference(reference, i), got)
    t0 = time.perf_counter()
    listed = len(store.ids())
    ids_s = time.perf_counter() - t0
    del store
    verify = bench_verify(url, n_images, size)
    shutil.rmtree(url)
    return {"format": f"CamStore zarr float16, compressor={compressor!r}, mantissa_bits={mantissa_bits}",
            "compressor": compressor, "mantissa_bits": mantissa_bits,
            "default": (compressor, mantissa_bits) == DEFAULT_FORMAT,
            "bytes": size, "bytes_allocated": allocated, "files": files,
            "write": {**throughput(n_images, payload, write_s), "create_seconds": create_s},
            "read": {**throughput(n_images, payload, read_s + open_s),
                     "ms_per_image_median": 1e3 * float(np.median(per_image)),
                     "open_seconds": open_s, "load_only_ms_per_image": 1e3 * read_s / n_images},
            "ids_listing": {"seconds": ids_s, "count": listed}, "verify": verify,
            "roundtrip": errors.as_dict()}


def bench_verify(url: str, n_images: int, size: int) -> dict:
    """Content hashing of the store as the pipeline does it (storage/digests.py): once when the stage finishes
    (``content_digests``), once more each time the finished stage is taken from the cache (``damaged_units``)."""
    t0 = time.perf_counter()
    digests = content_digests([url])
    record_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    damaged = damaged_units(digests)
    check_s = time.perf_counter() - t0
    return {"units": len(digests), "damaged": len(damaged), "record_seconds": record_s, "check_seconds": check_s,
            "check_ms_per_image": 1e3 * check_s / n_images, "check_MB_per_s_on_disk": size / 1e6 / check_s,
            "check_seconds_voc_train_aug": check_s / n_images * VOC_TRAIN_AUG}


def warm_up(root: Path, source: Source) -> None:
    """One untimed write + fresh open + load per format, so that imports, codec set-up and zarr's event loop
    are not charged to whichever format is timed first."""
    keys, proto, cam = source(0)
    path = root / "warmup.npy"
    np.save(path, {"keys": keys, "IS_CAM": proto, "IS_CAM1": cam})
    np.load(path, allow_pickle=True).item()
    path.unlink()
    for comp in cam_store._COMPRESSORS:
        url = str(root / f"warmup-{comp}.zarr")
        CamStore.create(url, "w", "w", CLASS_NAMES, compressor=comp).write("warmup", keys, proto, cam)
        CamStore.open(url).load("warmup")
        shutil.rmtree(url)


# ---------------------------------------------------------------------------------------------- dense CRF
def bench_crf(repeats: int = 2) -> dict:
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_labels
    except ImportError as err:
        return {"skipped": True, "note": f"pydensecrf not importable ({err}); CRF comparison skipped"}

    def crf(img: np.ndarray, labels: np.ndarray, n_labels: int = 3, t: int = 10) -> np.ndarray:
        h, w = img.shape[:2]
        d = dcrf.DenseCRF2D(w, h, n_labels)
        d.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=False))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(img)), compat=10)
        q = d.inference(t)
        return np.argmax(np.array(q).reshape((n_labels, h, w)), axis=0)

    rng = np.random.default_rng(0)
    size = 400
    noise_img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    noise_labels = [rng.integers(0, 3, size=(size, size)).astype(np.int64) for _ in range(2)]
    # a smoother, photo-like image (fewer distinct colours in the bilateral lattice) for context
    smooth_img = np.stack([_upsample(rng.uniform(0, 255, (12, 12)), size, size) for _ in range(3)], -1)
    smooth_img = np.clip(smooth_img + rng.normal(0, 4, smooth_img.shape), 0, 255).astype(np.uint8)
    smooth_labels = [np.argmax(np.stack([_upsample(rng.standard_normal((6, 6)), size, size) for _ in range(3)]), 0)
                     .astype(np.int64) for _ in range(2)]

    def timed(img: np.ndarray, labels: list) -> list[float]:
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for lab in labels:  # fg map and bg map, as the refinement stage does per image
                crf(img, lab)
            out.append(time.perf_counter() - t0)
        return out

    noise_s, smooth_s = timed(noise_img, noise_labels), timed(smooth_img, smooth_labels)
    return {"skipped": False,
            "setup": "DenseCRF2D 400x400, 3 labels, unary_from_labels gt_prob=0.7, addPairwiseGaussian(sxy=3, "
                     "compat=3), addPairwiseBilateral(sxy=50, srgb=5, compat=10), 10 iterations, x2 (fg + bg map)",
            "random_image_ms_per_image": 1e3 * float(np.median(noise_s)),
            "random_image_runs_ms": [1e3 * s for s in noise_s],
            "smooth_image_ms_per_image": 1e3 * float(np.median(smooth_s)),
            "smooth_image_runs_ms": [1e3 * s for s in smooth_s]}


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", help="take the images from this CAM store (e.g. a demo run's trained CAMs: "
                                        "runs/synthetic-demo/infer_cams/cams.zarr) instead of generating them")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cam_store.json")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.store:
        source, n = stored(args.store, args.images)
        shapes = [source(i)[1].shape for i in range(n)]
    else:
        n, source = args.images, generated(args.seed)
        shapes = [image_shape(args.seed, i) for i in range(n)]
    payload = sum(2 * int(np.prod(s)) * 4 for s in shapes)
    planes = [s[0] for s in shapes]
    data = {"images": n, "source": args.store or f"generated, seed {args.seed}", "float32_payload_bytes": payload,
            "channels_per_image": {str(c): planes.count(c) for c in sorted(set(planes))},
            "mean_pixels_per_image": float(np.mean([s[1] * s[2] for s in shapes]))}
    print(f"{n} images, {payload / 1e6:.1f} MB float32 payload (P + K)", flush=True)

    results: dict = {"benchmark": "cam_store", "python": platform.python_version(),
                     "platform": platform.platform(), "cpus": os.cpu_count(),
                     "zarr": __import__("zarr").__version__, "numpy": np.__version__,
                     "data": data, "default_format": format_name(*DEFAULT_FORMAT),
                     "note": "reads are warm page-cache reads of just-written files; shared machine, speeds rough"}
    with tempfile.TemporaryDirectory(prefix="bench-cam-store-") as tmp:
        root = Path(tmp)
        warm_up(root, source)
        reference = root / "reference"
        ref = bench_reference(reference, n, source, payload)
        print(f"reference: {ref['bytes'] / 1e6:.1f} MB, write {ref['write']['images_per_s']:.1f} img/s, "
              f"read {ref['read']['ms_per_image']:.2f} ms/img", flush=True)
        zarr_results = {}
        for comp, bits in FORMATS:
            r = bench_zarr(root, reference, comp, bits, n, payload)
            r["bytes_vs_reference"] = r["bytes"] / ref["bytes"]
            r["bytes_vs_float32"] = r["bytes"] / payload
            r["target_bytes_vs_float32"] = BYTES_TARGET
            r["pass_bytes"] = r["bytes_vs_float32"] <= BYTES_TARGET
            name = format_name(comp, bits)
            zarr_results[name] = r
            print(f"zarr {name:<18}{' (default)' if r['default'] else '          '}: {r['bytes'] / 1e6:.1f} MB "
                  f"({100 * r['bytes_vs_float32']:.1f} % of float32), write {r['write']['images_per_s']:.1f} img/s "
                  f"{r['write']['MB_per_s_f32_payload']:.0f} MB/s, read {r['read']['ms_per_image']:.2f} ms/img "
                  f"{r['read']['MB_per_s_f32_payload']:.0f} MB/s, max err {r['roundtrip']['max_abs_error']:.2e} "
                  f"(in [0,1]: {r['roundtrip']['max_abs_error_values_in_0_1']['max']:.2e})", flush=True)

    crf = bench_crf()
    if not crf["skipped"]:
        for r in zarr_results.values():
            read_ms = r["read"]["ms_per_image"]
            r["read_vs_crf_percent"] = {"random_image": 100 * read_ms / crf["random_image_ms_per_image"],
                                        "smooth_image": 100 * read_ms / crf["smooth_image_ms_per_image"]}
            r["pass_read_vs_crf"] = r["read_vs_crf_percent"]["random_image"] < CRF_RATIO_TARGET
        print(f"dense CRF x2: random image {crf['random_image_ms_per_image']:.0f} ms, smooth image "
              f"{crf['smooth_image_ms_per_image']:.0f} ms per image", flush=True)
    else:
        print(crf["note"], flush=True)

    default = zarr_results[format_name(*DEFAULT_FORMAT)]
    summary = {"default_format": format_name(*DEFAULT_FORMAT), "float32_payload_bytes": payload,
               "reference_bytes": ref["bytes"],
               "reference_read_ms_per_image": ref["read"]["ms_per_image"],
               "per_image_read_ms_cam_store": default["read"]["ms_per_image"],
               "verify_ms_per_image": default["verify"]["check_ms_per_image"],
               "verify_seconds_voc_train_aug": default["verify"]["check_seconds_voc_train_aug"],
               "targets": {"bytes_vs_float32_max": BYTES_TARGET,
                           "max_error": "relative_error_bound * |x| + absolute_error_floor of the format",
                           "read_vs_crf_percent_max": CRF_RATIO_TARGET}}
    for comp, r in zarr_results.items():
        summary[comp] = {"default": r["default"], "bytes_vs_float32": r["bytes_vs_float32"],
                         "bytes_vs_reference": r["bytes_vs_reference"], "pass_bytes": r["pass_bytes"],
                         "relative_error_bound": r["roundtrip"]["relative_error_bound"],
                         "max_abs_error_values_in_0_1": r["roundtrip"]["max_abs_error_values_in_0_1"]["max"],
                         "pass_error": r["roundtrip"]["pass_error"],
                         "read_ms_per_image": r["read"]["ms_per_image"]}
        if "read_vs_crf_percent" in r:
            summary[comp]["read_vs_crf_percent"] = r["read_vs_crf_percent"]["random_image"]
            summary[comp]["pass_read_vs_crf"] = r["pass_read_vs_crf"]
    results.update({"reference": ref, "zarr": zarr_results, "dense_crf": crf, "summary": summary,
                    "total_seconds": time.perf_counter() - started})

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")  # before printing: a closed stdout cannot lose it
    print(json.dumps(summary, indent=2))
    print(f"written to {args.out} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
