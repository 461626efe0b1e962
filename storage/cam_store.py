"""Chunked, compressed Zarr store of the CAMs produced by multi-scale CAM inference: one store per run.

Layout (Zarr format 3, any fsspec URL or local path, e.g. ``runs/<run>/cams.zarr``)::

    cams.zarr/                       group, attributes: sfc_cam_store=1, config_hash, checkpoint_hash, class_names
    cams.zarr/<image_id>/            one array per image (float16, or its bit patterns as int16 with the delta
                                     codec), shape (2, len(keys), H, W):
                                     [0] = P (prototype CAM), [1] = K (PCM CAM); attributes keys, size=[H, W], complete
    cams.zarr/<image_id>/c/0/0/0/0   the whole image in ONE shard file; inside it one chunk per class plane (1, 1, H, W)

``complete: true`` is written last, after the data, so an interrupted write is never mistaken for a finished one
(``is_complete`` / ``completed_ids`` / ``load`` all honour it). Re-writing an image clears the marker first.

Concurrency: processes may write *different* images into one store at the same time (each image is its own array,
the group is opened with mode "a" / "r+", never "w", and metadata is never consolidated). Never write the same
image from two processes at once, and do not read an image while it is being rewritten.

Compression (``compressor=``), measured on the demo's trained CAMs (bench/cam_store.py --store, bytes on disk over
the float32 payload; docs/cam.md): "delta-blosc-zstd" (default) 16.5 %, lossless on float16: the float16 bit
patterns are stored as int16 through numcodecs' Delta filter (each value minus its left neighbour, exact in
integers), then Blosc-Zstd 3 with byte shuffle; "blosc-zstd" 22.2 %, "blosc-lz4" 27.4 %, "zstd" 29.4 %, "none".
``mantissa_bits`` below 10 (:func:`round_mantissa`, bound :func:`error_bound`) trade exactness for size (8 bits with
delta: 12.1 %). Bit-shuffle does not help float16.

Only numpy, zarr and (for directory listings) fsspec are needed here: no torch, no prefect.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec
from zarr.codecs.numcodecs import Delta
from zarr.errors import BaseZarrError, ContainsGroupError

from storage import fs
from storage.errors import UserError

MARKER = "sfc_cam_store"
FORMAT_VERSION = 1
DEFAULT_COMPRESSOR = "delta-blosc-zstd"  # bench/cam_store.py --store: 16.5 % of float32 on trained CAMs, lossless
FLOAT16_MANTISSA_BITS = 10
DEFAULT_MANTISSA_BITS = FLOAT16_MANTISSA_BITS  # every bit of float16: the stored values are float16's rounding
_COMPRESSORS = ("delta-blosc-zstd", "blosc-lz4", "zstd", "blosc-zstd", "none")
_BITS_DTYPE = "int16"  # delta formats store float16 bit patterns, read back as float16 by a view
_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
_F16_MAX = float(np.finfo(np.float16).max)
# Failures that mean "no readable CAM store / image here" (I/O errors such as PermissionError still propagate).
_NOT_THERE = (BaseZarrError, FileNotFoundError, KeyError, ValueError, TypeError)
_Mode = Literal["r", "r+", "a"]  # never "w": it wipes the store


class CamStoreError(UserError, ValueError):
    """A CAM store or one of its images is missing, incomplete, incompatible or misused."""


@dataclass(frozen=True)
class _Codecs:
    """How one compressor name writes an image array: on-disk dtype, Zarr filters and compressors."""

    dtype: str
    filters: list[Any] | None
    compressors: list[Any] | None


@contextmanager
def _numcodecs_allowed() -> Iterator[None]:
    """Silence zarr's warning that numcodecs' Delta (zarr.codecs.numcodecs, read by zarr-python with numcodecs)
    is outside the core Zarr 3 specification; zarr warns each time such an array is created or opened."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        yield


def _codecs(name: str) -> _Codecs:
    zstd_shuffled = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)
    if name == "delta-blosc-zstd":
        with _numcodecs_allowed():
            delta = Delta(dtype="<i2")
        return _Codecs(_BITS_DTYPE, [delta], [zstd_shuffled])
    if name == "zstd":
        return _Codecs("float16", None, [ZstdCodec(level=3)])
    if name == "blosc-lz4":
        return _Codecs("float16", None, [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)])
    if name == "blosc-zstd":
        return _Codecs("float16", None, [zstd_shuffled])
    if name == "none":
        return _Codecs("float16", None, None)
    raise CamStoreError(f"unknown CAM compressor {name!r}; expected one of {', '.join(_COMPRESSORS)}")


def _check_mantissa_bits(bits: int) -> None:
    if not 1 <= bits <= FLOAT16_MANTISSA_BITS:
        raise CamStoreError(f"mantissa_bits must be in 1..{FLOAT16_MANTISSA_BITS}, got {bits}")


def error_bound(bits: int) -> tuple[float, float]:
    """(relative, absolute) with |stored - x| <= relative * |x| + absolute for a float32 value x within float16's
    range, in a store of ``bits``: float16's rounding (2**-11 relative; half its 2**-24 subnormal step) and then the
    mantissa rounding (2**-(bits + 1) relative; 2**(9 - bits) subnormal steps below float16's normal range,
    |x| < 6.1e-5, where the mantissa carries the value's magnitude)."""
    _check_mantissa_bits(bits)
    drop = FLOAT16_MANTISSA_BITS - bits
    relative_m = 2.0 ** -(bits + 1) if drop else 0.0
    absolute_m = 2.0 ** (drop - 1) * 2.0 ** -24 if drop else 0.0
    relative = 2.0 ** -11 + relative_m * (1 + 2.0 ** -11)
    return relative, 2.0 ** -25 * (1 + relative_m) + absolute_m


def round_mantissa(data: np.ndarray, bits: int) -> np.ndarray:
    """float16 ``data`` with its mantissa rounded to ``bits`` of float16's 10 bits (round half away from zero on
    the magnitude): relative error <= 2**-(bits + 1) of each value. Fewer bits leave runs that compress better."""
    _check_mantissa_bits(bits)
    drop = FLOAT16_MANTISSA_BITS - bits
    if drop == 0:
        return data
    pattern = np.ascontiguousarray(data, dtype=np.float16).view(np.uint16)
    sign, magnitude = pattern & 0x8000, (pattern & 0x7FFF).astype(np.uint32)
    magnitude = (magnitude + (1 << (drop - 1))) & ~np.uint32((1 << drop) - 1)
    return (sign | np.minimum(magnitude, 0x7C00).astype(np.uint16)).view(np.float16)


def _storage_options(url: str) -> dict[str, Any] | None:
    """file:// URLs need auto_mkdir to write nested keys; plain paths use LocalStore, which takes no options."""
    return {"auto_mkdir": True} if url.startswith(("file://", "local://")) else None


def _open_group(url: str, mode: _Mode, **kwargs: Any) -> zarr.Group:
    return zarr.open_group(url, mode=mode, use_consolidated=False, storage_options=_storage_options(url), **kwargs)


class CamStore:
    """CAMs of one run: ``write`` per image from any number of processes, ``load`` / ``fused`` to read them back."""

    def __init__(self, url: str, group: zarr.Group, writable: bool, compressor: str = DEFAULT_COMPRESSOR,
                 mantissa_bits: int = FLOAT16_MANTISSA_BITS):
        """Use :meth:`create` or :meth:`open`."""
        self.url = url
        self.mantissa_bits = mantissa_bits
        self._group = group
        self._writable = writable
        self._codecs = _codecs(compressor)
        self.compressor = compressor
        attrs = group.attrs.asdict()
        class_names = attrs["class_names"]
        assert isinstance(class_names, list), class_names  # _check_group checked it
        self._config_hash = str(attrs["config_hash"])
        self._checkpoint_hash = str(attrs["checkpoint_hash"])
        self._class_names = [str(c) for c in class_names]

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, url: str, config_hash: str, checkpoint_hash: str, class_names: Sequence[str],
               compressor: str = DEFAULT_COMPRESSOR, mantissa_bits: int = DEFAULT_MANTISSA_BITS) -> CamStore:
        """Open ``url`` for writing, creating the store if absent; an existing store must match. Never wipes.

        Values are written as float16 with ``mantissa_bits`` of its 10 mantissa bits (:func:`round_mantissa`)."""
        url = str(url)
        _codecs(compressor)  # fail on bad arguments before touching storage
        _check_mantissa_bits(mantissa_bits)
        class_names = [str(c) for c in class_names]
        try:
            group = _open_group(url, "r")
        except _NOT_THERE:
            group = None
        if group is None:
            if fs.isdir(url) and fs.listdir(url):
                raise CamStoreError(f"{url} exists and is not a CAM store (no Zarr group); refusing to write into it")
            if fs.exists(url) and not fs.isdir(url):
                raise CamStoreError(f"{url} exists and is a file, not a CAM store")
            attributes = {MARKER: FORMAT_VERSION, "config_hash": str(config_hash),
                          "checkpoint_hash": str(checkpoint_hash), "class_names": class_names}
            try:  # zarr.json is written once, attributes included, so no reader sees a group without them
                group = _open_group(url, "a", zarr_format=3, attributes=attributes)
            except ContainsGroupError:  # another process created it between our two calls
                group = _open_group(url, "r+")
        else:
            group = _open_group(url, "r+")
        _check_group(url, group, config_hash, checkpoint_hash)
        store = cls(url, group, writable=True, compressor=compressor, mantissa_bits=mantissa_bits)
        if store.class_names != class_names:
            raise CamStoreError(f"CAM store {url} holds classes {store.class_names}, this stage expects {class_names}")
        return store

    @classmethod
    def open(cls, url: str, config_hash: str | None = None, checkpoint_hash: str | None = None) -> CamStore:
        """Read access to an existing store; given hashes must match the ones it was written with."""
        url = str(url)
        try:
            group = _open_group(url, "r")
        except _NOT_THERE as err:
            raise CamStoreError(f"{url} is not a CAM store (no Zarr group there: {err})") from err
        _check_group(url, group, config_hash, checkpoint_hash)
        return cls(url, group, writable=False)

    # ------------------------------------------------------------------ attributes
    @property
    def attrs(self) -> dict[str, Any]:
        """config_hash, checkpoint_hash and class_names of the store (a copy)."""
        return {"config_hash": self._config_hash, "checkpoint_hash": self._checkpoint_hash,
                "class_names": self.class_names}

    @property
    def config_hash(self) -> str:
        return self._config_hash

    @property
    def checkpoint_hash(self) -> str:
        return self._checkpoint_hash

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    def __repr__(self) -> str:
        return f"CamStore({self.url!r}, config={self.config_hash}, checkpoint={self.checkpoint_hash})"

    # ------------------------------------------------------------------ writing
    def write(self, image_id: str, keys: np.ndarray, proto_cam: np.ndarray, cam: np.ndarray) -> None:
        """Store P (``proto_cam``) and K (``cam``), each (len(keys), H, W), of one image; overwrites a previous one.

        ``keys`` are the int class indices of the planes (background 0 first). Values are stored as float16 with
        the store's ``mantissa_bits``, within :func:`error_bound` (10 bits: <= 5e-4 in [0, 1]).
        """
        if not self._writable:
            raise CamStoreError(f"CAM store {self.url} was opened read-only; use CamStore.create to write")
        name = self._check_id(image_id)
        keys = np.asarray(keys)
        if keys.ndim != 1 or keys.size == 0 or not np.issubdtype(keys.dtype, np.integer):
            raise CamStoreError(f"image {name!r} ({self.url}): keys must be a non-empty 1-D integer array, "
                                f"got shape {keys.shape} dtype {keys.dtype}")
        if (keys < 0).any() or len(np.unique(keys)) != len(keys):
            raise CamStoreError(f"image {name!r} ({self.url}): keys must be distinct non-negative class indices, "
                                f"got {keys.tolist()}")
        proto_cam, cam = np.asarray(proto_cam), np.asarray(cam)
        if proto_cam.ndim != 3 or proto_cam.shape != cam.shape or proto_cam.shape[0] != len(keys) \
                or 0 in proto_cam.shape:
            raise CamStoreError(f"image {name!r} ({self.url}): proto_cam and cam must both be (len(keys)={len(keys)},"
                                f" H, W), got {proto_cam.shape} and {cam.shape}")
        data = np.empty((2, *cam.shape), dtype=np.float16)
        with np.errstate(over="ignore", invalid="ignore"):
            data[0], data[1] = proto_cam, cam
            data = round_mantissa(data, self.mantissa_bits)
        if not np.isfinite(data).all():
            raise CamStoreError(f"image {name!r} ({self.url}): CAMs must be finite and within float16 range "
                                f"(|x| <= {_F16_MAX:g})")
        height, width = cam.shape[1:]

        try:  # clear the completion marker of a previous version before touching its data
            old = self._node(name)
            if old.attrs.get("complete"):
                old.update_attributes({"complete": False})
        except _NOT_THERE:
            pass
        codecs = self._codecs
        with _numcodecs_allowed():
            array = self._group.create_array(
                name, shape=data.shape, dtype=codecs.dtype, chunks=(1, 1, height, width), shards=data.shape,
                filters=codecs.filters, compressors=codecs.compressors, fill_value=0, overwrite=True,
                config={"write_empty_chunks": False},
                attributes={"keys": [int(k) for k in keys], "size": [int(height), int(width)], "complete": False})
        array[...] = data.view(codecs.dtype)
        array.update_attributes({"complete": True})  # last: the data is all there

    # ------------------------------------------------------------------ reading
    def is_complete(self, image_id: str) -> bool:
        """True if the image was written completely (its completion marker is set)."""
        name = self._check_id(image_id)
        try:
            return self._node(name).attrs.get("complete") is True
        except _NOT_THERE:
            return False

    def completed_ids(self) -> set[str]:
        """Ids of all completely written images."""
        try:
            with _numcodecs_allowed():
                members = self._group.members()
        except _NOT_THERE:  # e.g. an image being rewritten right now: look at the images one by one
            done = set()
            for name in fs.listdir(self.url):
                if name != "zarr.json" and _valid_id(name) and self.is_complete(name):
                    done.add(name)
            return done
        return {name for name, node in members
                if isinstance(node, zarr.Array) and _valid_id(name) and node.attrs.get("complete") is True}

    def ids(self) -> list[str]:
        """Ids of all completely written images, sorted."""
        return sorted(self.completed_ids())

    def __len__(self) -> int:
        return len(self.completed_ids())

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and _valid_id(image_id) and self.is_complete(image_id)

    def load(self, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys int64 (C,), P float32 (C, H, W), K float32 (C, H, W)) of one completely written image."""
        name = self._check_id(image_id)
        try:
            array = self._node(name)
        except _NOT_THERE as err:
            raise CamStoreError(f"image {name!r} is not in CAM store {self.url}") from err
        attrs = array.attrs.asdict()
        if not isinstance(array, zarr.Array) or attrs.get("complete") is not True:
            raise CamStoreError(f"image {name!r} in CAM store {self.url} is incomplete (interrupted write?); "
                                "rerun CAM inference for it")
        keys = np.asarray(attrs["keys"], dtype=np.int64)
        try:
            data = np.asarray(array[...])
            if data.dtype == np.dtype(_BITS_DTYPE):
                data = data.view(np.float16)
        except Exception as err:  # codecs raise many types for damaged chunks
            raise CamStoreError(f"image {name!r} in CAM store {self.url}: unreadable data ({type(err).__name__}: "
                                f"{err}); the store is damaged, rerun CAM inference for it") from err
        if data.shape[:2] != (2, len(keys)):
            raise CamStoreError(f"image {name!r} in CAM store {self.url}: array shape {data.shape} does not match "
                                f"{len(keys)} keys")
        return keys, data[0].astype(np.float32), data[1].astype(np.float32)

    def fused(self, image_id: str, proto_weight: float) -> tuple[np.ndarray, np.ndarray]:
        """(keys, K + proto_weight * P) in float32."""
        keys, proto_cam, cam = self.load(image_id)
        proto_cam *= np.float32(proto_weight)
        proto_cam += cam
        return keys, proto_cam

    # ------------------------------------------------------------------ helpers
    def _node(self, name: str) -> zarr.Array | zarr.Group:
        with _numcodecs_allowed():
            return self._group[name]

    def _check_id(self, image_id: str) -> str:
        if not isinstance(image_id, str) or not _valid_id(image_id):
            raise CamStoreError(f"invalid image id {image_id!r} for CAM store {self.url}: expected "
                                "[A-Za-z0-9_.-]+ (not '.', '..', 'zarr.json' or starting with '__')")
        return image_id


def _valid_id(image_id: str) -> bool:
    return (bool(_ID.match(image_id)) and image_id.strip(".") != "" and image_id != "zarr.json"
            and not image_id.startswith("__"))


def _check_group(url: str, group: zarr.Group, config_hash: str | None, checkpoint_hash: str | None) -> None:
    attrs = group.attrs.asdict()
    if attrs.get(MARKER) != FORMAT_VERSION or not all(k in attrs for k in ("config_hash", "checkpoint_hash")) \
            or not isinstance(attrs.get("class_names"), list):
        raise CamStoreError(f"{url} is not a CAM store (a Zarr group without the {MARKER!r}={FORMAT_VERSION} "
                            "attribute and hashes)")
    want_config = attrs["config_hash"] if config_hash is None else str(config_hash)
    want_checkpoint = attrs["checkpoint_hash"] if checkpoint_hash is None else str(checkpoint_hash)
    if (attrs["config_hash"], attrs["checkpoint_hash"]) != (want_config, want_checkpoint):
        raise CamStoreError(
            f"CAM store {url} was written with config {attrs['config_hash']} / checkpoint {attrs['checkpoint_hash']}, "
            f"this stage expects config {want_config} / checkpoint {want_checkpoint}; use another run directory or "
            "delete the store")
