"""Images/s of multi-scale CAM inference: the project's path against a reference-style loop (make_cam.py).

Both paths run the same ResNet-50 SFC network (the reference weights in tests/golden/sfc_weights.npz, eval mode)
on the same N deterministic synthetic JPEG images, scales 1.0, 0.5, 1.5, 2.0, each with its horizontal flip:

reference  per image, per scale: PIL bicubic resize, normalise, [image, flip] batch of 2, ``forward_cams`` in
           fp32, outputs moved to host numpy after every scale; the scales are fused on the CPU (``fuse_scales``:
           bilinear upsampling, sum, max-normalisation, background trick) and P and K are saved as float32 with
           ``np.save`` of a pickled dict, one .npy per image.
project    the CAM stage's own code: the network prepared by ``models.cam_inference.prepare_for_inference``
           (BatchNorm folded into the convolutions; channels_last on CUDA), and the stage's loop
           ``infer_to_writer`` fed by a torch DataLoader (``--workers`` processes) that decodes each image once and
           builds all of its scaled flip pairs. Per image, ``multiscale_cams`` queues the four forwards back to
           back, drops the absent classes, fuses on the device and copies to the host once; on CPU ``--streams``
           images are computed at once (one intra-op thread each on the default settings), on CUDA one stream,
           optionally under fp16 autocast (``--amp``, CUDA default). P and K are written as float16 by a background
           writer thread into a Zarr ``storage.cam_store.CamStore``. Fallback when zarr (or fsspec, which CamStore
           needs) cannot be imported, e.g. on a bare GPU machine: one uncompressed ``np.savez`` of float16
           keys/P/K per image; the JSON says which backend ran ("storage").

Equality: P and K as written by both paths are read back and compared per image; the fp32 project run must agree
with the reference to float16 storage error (max abs difference <= 2e-3 on values in [0, 2]). With ``--amp`` the
project path runs twice, autocast (timed, the headline) and fp32 (timed too, and the one held to the tolerance);
the amp difference is reported for information. CUDA runs keep PyTorch's default TF32 settings in both paths.

The numeric core imports only torch, numpy and PIL (zarr/fsspec optional), so it runs on a bare GPU machine:

    python bench/cam_infer.py                       # GPU if present: 100 images of 300-500 px, 2 workers, amp
    python bench/cam_infer.py --device cpu          # 16 images of 96-160 px, 1 worker, fp32, 1 stream per thread
    python bench/cam_infer.py --device cuda --images 50 --workers 4 --no-amp --out /tmp/x.json

Results go to bench/results/cam_infer-<cpu|gpu>.json and are printed. ``--repeats`` (default 3) repetitions of
one timed run of each path, interleaved (reference, project; then project, reference; ...) so that a machine's
changing load hits both; the headline speedup is the median of the per-repetition ratios. Every run is its own
subprocess (no path inherits another's warm oneDNN / cuDNN caches) after an untimed warm-up on the first image at
every scale. Image sizes are VOC-like by default (``--sizes voc``: mostly the 4:3 shape at the long side, see
``draw_size``); ``--sizes uniform`` draws H and W independently, so every image is a new shape. The reference
path is profiled by stage (decode, resize+normalise, forward incl. the host copy, fuse, save) and the project path
by where its main thread waits (items from the loader, compute, writer) to show where the time goes.

OpenMP wait policy (CPU): PyTorch's OpenMP threads spin at every barrier before they sleep. When another process
holds one of the cores, the reference's two intra-op threads stall each other at every operator (its CPU time
per wall second rises while its images/s collapse, several-fold on a shared 2-core machine), whereas the
project's single-threaded streams run on regardless. So that this does not pass for an algorithmic gain, the CPU
benchmark also runs both paths with ``OMP_WAIT_POLICY=PASSIVE`` (keys ``*_omp_passive``): ``speedup`` is the
ratio under the default policy, ``speedup_omp_passive`` the one under PASSIVE, and ``target_met`` needs both.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.cam_inference import DEFAULT_SCALES, fuse_scales, infer_to_writer, prepare_for_inference  # noqa: E402
from models.reference_weights import load_reference_weights  # noqa: E402
from models.sfc import SFCNet  # noqa: E402
from storage.transforms import normalize  # noqa: E402  (numpy only; storage/__init__.py is empty)

try:  # optional: needs zarr and fsspec (storage.fs); absent on a bare GPU machine
    from storage.cam_store import CamStore
except ImportError as _err:  # pragma: no cover - depends on the machine
    CamStore = None
    _CAMSTORE_ERROR = f"{type(_err).__name__}: {_err}"
else:
    _CAMSTORE_ERROR = None

GOLDEN_WEIGHTS = ROOT / "tests" / "golden" / "sfc_weights.npz"
NUM_CLASSES = 20
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
TOLERANCE = 2e-3
TARGET_SPEEDUP = {"cuda": 3.0, "cpu": 1.3}


# ---------------------------------------------------------------------------------------------- images and labels
def draw_size(rng: np.random.Generator, low: int, high: int, sizes: str) -> tuple[int, int]:
    """(H, W) in [low, high]. "uniform": H and W independently uniform. "voc": like VOC, whose images are mostly
    500 x 375 (landscape) or 375 x 500 (portrait): 60 % get that 4:3 shape at the long side ``high`` (70 % of those
    landscape), the rest are uniform. Repeated shapes matter on the CPU: oneDNN builds its convolution primitives
    per input shape, and a first call at a new shape costs several times a repeated one."""
    if sizes == "voc" and rng.random() < 0.6:
        long_side, short_side = high, max(low, round(high * 0.75))
        return (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)
    height, width = rng.integers(low, high + 1, size=2)
    return int(height), int(width)


def make_images(n: int, low: int, high: int, seed: int = 0, sizes: str = "voc") -> tuple[list[bytes], np.ndarray]:
    """``n`` deterministic synthetic JPEGs (smooth colour field, 1-4 flat ellipses, mild noise) with sizes from
    :func:`draw_size`, and (n, 20) float32 multi-hot labels with 1-3 present classes each."""
    rng = np.random.default_rng(seed)
    jpegs, labels = [], np.zeros((n, NUM_CLASSES), dtype=np.float32)
    for index in range(n):
        height, width = draw_size(rng, low, high, sizes)
        coarse = rng.integers(0, 256, size=(int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3), dtype=np.uint8)
        array = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(np.float32)
        yy, xx = np.mgrid[:height, :width]
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.1, 0.4) * height, rng.uniform(0.1, 0.4) * width
            array[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.integers(0, 256, size=3)
        array = np.clip(array + rng.normal(0, 8, array.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
        labels[index, rng.choice(NUM_CLASSES, size=int(rng.integers(1, 4)), replace=False)] = 1
    return jpegs, labels


def decode(jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def scaled_pair(image: Image.Image, scale: float) -> torch.Tensor:
    """Same as storage.datasets.cam_inference.scaled_pair (which is not imported: its module pulls in fsspec):
    (2, 3, round(H*s), round(W*s)) bicubic-resized, normalised image and its horizontal flip."""
    width, height = image.size
    if scale != 1.0:
        image = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
    array = torch.from_numpy(np.ascontiguousarray(normalize(np.asarray(image)).transpose(2, 0, 1)))
    return torch.stack([array, array.flip(-1)])


def image_id(index: int) -> str:
    return f"bench_{index:05d}"


def keys_of(label: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.nonzero(label)[0] + 1]).astype(np.int64)


# ---------------------------------------------------------------------------------------------- output sinks
class ReferenceSink:
    """make_cam.py style: one pickled dict of float32 arrays per image (np.save)."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, keys: np.ndarray, proto_cam: np.ndarray, cam: np.ndarray) -> None:
        np.save(self.directory / f"{name}.npy", {"keys": keys, "P": proto_cam, "K": cam})

    def load(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        data = np.load(self.directory / f"{name}.npy", allow_pickle=True).item()
        return data["keys"], data["P"], data["K"]


class ZarrSink:
    """The project's CAM store (float16, blosc-lz4, one shard per image)."""

    kind = "zarr CamStore (float16, blosc-lz4)"

    def __init__(self, directory: Path):
        self.store = CamStore.create(str(directory), config_hash="bench", checkpoint_hash="bench",
                                     class_names=VOC_CLASSES)

    def write(self, name: str, keys: np.ndarray, proto_cam: np.ndarray, cam: np.ndarray) -> None:
        self.store.write(name, keys, proto_cam, cam)

    def load(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.store.load(name)


class NpzSink:
    """Fallback without zarr: one uncompressed np.savez of float16 P and K (and int64 keys) per image."""

    kind = "np.savez float16 (fallback: CamStore not importable)"

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, keys: np.ndarray, proto_cam: np.ndarray, cam: np.ndarray) -> None:
        np.savez(self.directory / f"{name}.npz", keys=np.asarray(keys, dtype=np.int64),
                 P=np.asarray(proto_cam, dtype=np.float16), K=np.asarray(cam, dtype=np.float16))

    def load(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with np.load(self.directory / f"{name}.npz") as data:
            return data["keys"], data["P"].astype(np.float32), data["K"].astype(np.float32)


def project_sink(directory: Path, force_npz: bool):
    if CamStore is None or force_npz:
        return NpzSink(directory)
    return ZarrSink(directory)


# ---------------------------------------------------------------------------------------------- the two paths
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_reference(model: SFCNet, jpegs: list[bytes], labels: np.ndarray, scales: tuple[float, ...],
                  device: torch.device, sink: ReferenceSink) -> dict:
    """The reference-style loop; returns images/s and the time per stage."""
    stages = dict.fromkeys(("decode", "resize_normalize", "forward_and_host_copy", "fuse", "save"), 0.0)
    synchronize(device)
    start = time.perf_counter()
    for index, jpeg in enumerate(jpegs):
        t0 = time.perf_counter()
        image = decode(jpeg)
        size = (image.size[1], image.size[0])
        label = labels[index]
        label_bg = torch.from_numpy(np.concatenate([[1.0], label]).astype(np.float32)).to(device)
        stages["decode"] += time.perf_counter() - t0
        protos, cams = [], []
        for scale in scales:
            t0 = time.perf_counter()
            pair = scaled_pair(image, scale)
            t1 = time.perf_counter()
            out = model.forward_cams(pair.to(device), label_bg)
            protos.append(out.proto_cam.cpu().numpy())
            cams.append(out.cam.cpu().numpy())
            t2 = time.perf_counter()
            stages["resize_normalize"] += t1 - t0
            stages["forward_and_host_copy"] += t2 - t1
        t0 = time.perf_counter()
        keys = keys_of(label)
        select = torch.from_numpy(keys)
        proto_cam = fuse_scales([torch.from_numpy(p) for p in protos], size)[select].numpy()
        cam = fuse_scales([torch.from_numpy(c) for c in cams], size)[select].numpy()
        t1 = time.perf_counter()
        sink.write(image_id(index), keys, proto_cam, cam)
        stages["fuse"] += t1 - t0
        stages["save"] += time.perf_counter() - t1
    seconds = time.perf_counter() - start
    return {"images_per_second": len(jpegs) / seconds, "seconds": seconds,
            "stage_seconds": stages, "stage_share": {k: v / seconds for k, v in stages.items()}}


class MultiScalePairs(Dataset):
    """Decode once, resize to every scale (bicubic), normalise, pair with the flip: all in the worker. Items as
    storage.datasets.cam_inference.MultiScaleSet gives them to the CAM stage."""

    def __init__(self, jpegs: list[bytes], labels: np.ndarray, scales: tuple[float, ...]):
        self.jpegs, self.labels, self.scales = jpegs, labels, scales

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, index: int) -> dict:
        image = decode(self.jpegs[index])
        return {"id": image_id(index), "label": torch.from_numpy(self.labels[index]),
                "size": (image.size[1], image.size[0]), "pairs": [scaled_pair(image, s) for s in self.scales]}


def run_project(model: SFCNet, jpegs: list[bytes], labels: np.ndarray, scales: tuple[float, ...],
                device: torch.device, workers: int, amp: bool, cpu_streams: int, sink) -> dict:
    """The CAM stage's loop (``models.cam_inference.infer_to_writer``, as tasks/infer_cams.py runs it) fed by a
    DataLoader; returns images/s and where the main thread waited."""
    loader = DataLoader(MultiScalePairs(jpegs, labels, scales), batch_size=None, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    writer_busy = [0.0]

    def write(name: str, keys: np.ndarray, proto_cam: np.ndarray, cam: np.ndarray) -> None:
        t0 = time.perf_counter()
        sink.write(name, keys, proto_cam, cam)
        writer_busy[0] += time.perf_counter() - t0

    synchronize(device)
    start = time.perf_counter()
    waits = infer_to_writer(model, loader, write, device, amp, cpu_streams)
    seconds = time.perf_counter() - start
    return {"images_per_second": len(jpegs) / seconds, "seconds": seconds, "main_thread_waits": waits,
            "writer_thread_busy_seconds": writer_busy[0], "amp": amp, "cpu_streams": cpu_streams}


# ---------------------------------------------------------------------------------------------- comparison
def compare(reference: ReferenceSink, project, n: int) -> dict:
    worst = {"P": 0.0, "K": 0.0}
    worst_mean = {"P": 0.0, "K": 0.0}
    value_max = 0.0
    for index in range(n):
        name = image_id(index)
        keys_r, p_r, k_r = reference.load(name)
        keys_p, p_p, k_p = project.load(name)
        if not np.array_equal(keys_r, keys_p) or p_r.shape != p_p.shape or k_r.shape != k_p.shape:
            raise AssertionError(f"{name}: keys/shapes differ: {keys_r} {p_r.shape} vs {keys_p} {p_p.shape}")
        for tag, a, b in (("P", p_r, p_p), ("K", k_r, k_p)):
            diff = np.abs(a.astype(np.float64) - b)
            worst[tag] = max(worst[tag], float(diff.max()))
            worst_mean[tag] = max(worst_mean[tag], float(diff.mean()))
        value_max = max(value_max, float(p_r.max()), float(k_r.max()))
    return {"max_abs_diff_P": worst["P"], "max_abs_diff_K": worst["K"],
            "max_abs_diff": max(worst.values()), "worst_image_mean_abs_diff": max(worst_mean.values()),
            "reference_value_max": value_max}


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def open_sink(directory: Path, kind: str):
    """Re-open a project path's output for the comparison (in the parent process)."""
    return ZarrSink(directory) if kind == ZarrSink.kind else NpzSink(directory)


def identical_outputs(workdir: Path, role: str, runs: list[dict], n: int) -> bool:
    """Whether every repetition of ``role`` wrote exactly the outputs of its first."""
    sinks = [open_sink(workdir / f"{role}-{repeat}", run["storage"]) for repeat, run in enumerate(runs)]
    return all(np.array_equal(a, b) for sink in sinks[1:] for index in range(n)
               for a, b in zip(sinks[0].load(image_id(index)), sink.load(image_id(index))))


# ---------------------------------------------------------------------------------------------- one path per process
def run_role(args: argparse.Namespace) -> dict:
    """One path (``args.role``) in this process, so that no path inherits another's warm caches. Untimed warm-up
    first: the first image at every scale, through the path's own code."""
    device = torch.device(args.device)
    scales = tuple(DEFAULT_SCALES)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    jpegs, labels = make_images(args.images, args.min_size, args.max_size, args.seed, args.sizes)
    model = load_reference_weights(SFCNet(NUM_CLASSES, "resnet50"), GOLDEN_WEIGHTS)
    out_dir = Path(args.workdir) / f"{run_key(args.role, args.omp_passive)}-{args.repeat}"
    load_before = os.getloadavg()
    if args.role == "reference":
        model = model.to(device).eval()
        run_reference(model, jpegs[:1], labels[:1], scales, device, ReferenceSink(out_dir.with_name("warm-up")))
        cpu_before = time.process_time()
        result = run_reference(model, jpegs, labels, scales, device, ReferenceSink(out_dir))
    else:
        amp = args.role == "project" and args.amp
        model = prepare_for_inference(model, device)  # as tasks/infer_cams.load_cam_network does
        infer_to_writer(model, [MultiScalePairs(jpegs, labels, scales)[0]], lambda *_: None, device, amp,
                        args.streams)
        sink = project_sink(out_dir, args.npz)
        cpu_before = time.process_time()
        result = run_project(model, jpegs, labels, scales, device, args.workers, amp, args.streams, sink)
        result["storage"] = sink.kind
    synchronize(device)
    result["cpu_seconds"] = time.process_time() - cpu_before  # all threads of this process; > seconds x cores: spin
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    result["output_bytes"] = directory_bytes(out_dir)
    result["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    result["torch_threads"] = torch.get_num_threads()
    return result


def run_key(role: str, omp_passive: bool) -> str:
    return f"{role}_omp_passive" if omp_passive else role


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def median(values: list[float]) -> float:
    return float(np.median(values))


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="default 100 on GPU, 16 on CPU")
    parser.add_argument("--min-size", type=int, default=None, help="smallest H/W; default 300 on GPU, 96 on CPU")
    parser.add_argument("--max-size", type=int, default=None, help="largest H/W; default 500 on GPU, 160 on CPU")
    parser.add_argument("--sizes", choices=["voc", "uniform"], default="voc",
                        help="image size distribution (see draw_size); default voc-like")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers; default 2 on GPU, 1 on CPU")
    parser.add_argument("--streams", type=int, default=torch.get_num_threads(),
                        help="CPU: images computed at once by the project path (infer_cams.cpu_streams); "
                             "default one per intra-op thread (%(default)s here)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="fp16 autocast for the project path (CUDA only); default on")
    parser.add_argument("--omp-passive", action=argparse.BooleanOptionalAction, default=None,
                        help="also run both paths with OMP_WAIT_POLICY=PASSIVE; default on for CPU")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of (reference, project), interleaved")
    parser.add_argument("--npz", action="store_true", help="force the np.savez float16 fallback instead of Zarr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default=None, help="free-text note on the machine, stored in the JSON")
    parser.add_argument("--out", default=None)
    parser.add_argument("--in-process", action="store_true",
                        help="run every path in this process (a smoke run: the paths then share warm caches; no "
                             "OMP_WAIT_POLICY runs)")
    parser.add_argument("--role", choices=["reference", "project", "project_fp32"], help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.amp and not cuda:
        parser.error("--amp is CUDA only (the CPU path runs fp32)")
    if not GOLDEN_WEIGHTS.exists():
        raise SystemExit(f"{GOLDEN_WEIGHTS} missing: the benchmark needs the reference weights")
    args.images = args.images or (100 if cuda else 16)
    args.min_size = args.min_size or (300 if cuda else 96)
    args.max_size = args.max_size or (500 if cuda else 160)
    args.workers = args.workers if args.workers is not None else (2 if cuda else 1)
    args.amp = cuda if args.amp is None else args.amp
    args.omp_passive = not (cuda or args.in_process) if args.omp_passive is None else args.omp_passive
    if args.omp_passive and args.in_process:
        parser.error("--omp-passive needs a subprocess per run (OMP_WAIT_POLICY): drop --in-process")
    if args.role:
        print(json.dumps(run_role(args)))
        return

    roles = ["reference", "project"] + (["project_fp32"] if args.amp else [])
    # (role, passive): every path under the default OpenMP wait policy, and on CPU also under PASSIVE, where a
    # thread that waits at a barrier sleeps instead of spinning on a core another process may need
    runs_per_repeat = [(role, passive) for passive in ([False, True] if args.omp_passive else [False])
                       for role in roles]
    tmp = Path(tempfile.mkdtemp(prefix="cam_infer_bench_"))
    runs: dict[str, list[dict]] = {run_key(role, passive): [] for role, passive in runs_per_repeat}
    load_start = os.getloadavg()
    try:
        for repeat in range(args.repeats):
            for role, passive in runs_per_repeat if repeat % 2 == 0 else runs_per_repeat[::-1]:  # A B.., ..B A
                key = run_key(role, passive)
                if args.in_process:
                    runs[key].append(run_role(argparse.Namespace(**{**vars(args), "role": role, "repeat": repeat,
                                                                     "workdir": str(tmp)})))
                    continue
                cmd = [sys.executable, __file__, "--role", role, "--repeat", str(repeat), "--workdir", str(tmp),
                       "--device", args.device, "--images", str(args.images), "--min-size", str(args.min_size),
                       "--max-size", str(args.max_size), "--sizes", args.sizes, "--workers", str(args.workers),
                       "--streams", str(args.streams), "--amp" if args.amp else "--no-amp",
                       "--omp-passive" if passive else "--no-omp-passive",
                       "--seed", str(args.seed)] + (["--npz"] if args.npz else [])
                env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"} if passive else None
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
                runs[key].append(json.loads(out.strip().splitlines()[-1]))
                print(f"repeat {repeat} {key}: {runs[key][-1]['images_per_second']:.3f} images/s", file=sys.stderr)
        reference_sink = ReferenceSink(tmp / "reference-0")
        project_keys = [key for key in runs if not key.startswith("reference")]
        for key in project_keys:
            for repeat, run in enumerate(runs[key]):
                run["vs_reference"] = compare(reference_sink, open_sink(tmp / f"{key}-{repeat}", run["storage"]),
                                              args.images)
        deterministic = all(identical_outputs(tmp, key, runs[key], args.images) for key in project_keys)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def ratios(project: str, reference: str) -> list[float]:
        return [p["images_per_second"] / r["images_per_second"] for p, r in zip(runs[project], runs[reference])]

    fp32_key = "project_fp32" if args.amp else "project"
    speedups = {"default": median(ratios("project", "reference"))}
    if args.omp_passive:
        speedups["omp_passive"] = median(ratios("project_omp_passive", "reference_omp_passive"))
    forward_share = median([run["stage_share"]["forward_and_host_copy"] for run in runs["reference"]])
    fp32_keys = [key for key in project_keys if not (args.amp and key == "project")]  # "project" is amp with --amp
    max_diff = max(run["vs_reference"]["max_abs_diff"] for key in fp32_keys for run in runs[key])
    report = {
        "device": torch.cuda.get_device_name() if cuda else cpu_model(),
        "device_type": args.device,
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "load_average_start_end": [load_start[0], os.getloadavg()[0]], "note": args.note},
        "torch": torch.__version__, "numpy": np.__version__,
        "torch_threads": runs["reference"][0]["torch_threads"],
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
        if cuda else None,
        "settings": {"images": args.images, "size_range": [args.min_size, args.max_size], "sizes": args.sizes,
                     "scales": list(DEFAULT_SCALES), "workers": args.workers, "cpu_streams": args.streams,
                     "amp": args.amp, "omp_passive_runs": args.omp_passive, "repeats": args.repeats,
                     "seed": args.seed, "weights": GOLDEN_WEIGHTS.name, "storage": runs["project"][0]["storage"],
                     "camstore_import_error": _CAMSTORE_ERROR,
                     "isolation": "each run in its own subprocess after an untimed warm-up on the first image; "
                                  "repetitions interleaved, order reversed every other repetition"},
        "images_per_second": {key: [run["images_per_second"] for run in runs[key]] for key in runs},
        "cpu_seconds_per_wall_second": {key: [run["cpu_seconds"] / run["seconds"] for run in runs[key]]
                                        for key in runs},
        "speedup_per_repeat": {"default": ratios("project", "reference"),
                               **({"omp_passive": ratios("project_omp_passive", "reference_omp_passive")}
                                  if args.omp_passive else {})},
        "speedup": speedups["default"],
        "speedup_omp_passive": speedups.get("omp_passive"),
        "speedup_fp32": median(ratios(fp32_key, "reference")),
        "target_speedup": TARGET_SPEEDUP[args.device],
        "target_met": min(speedups.values()) >= TARGET_SPEEDUP[args.device],
        "reference_forward_share": forward_share,
        "max_speedup_without_faster_forward": 1.0 / forward_share if forward_share > 0 else None,
        "max_abs_diff_fp32": max_diff,
        "max_abs_diff_amp": max(run["vs_reference"]["max_abs_diff"] for run in runs["project"]) if args.amp else None,
        "tolerance": TOLERANCE,
        "equal_within_tolerance": max_diff <= TOLERANCE,
        "project_outputs_identical_across_repeats": deterministic,
        "runs": runs,
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"cam_infer-{'gpu' if cuda else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
