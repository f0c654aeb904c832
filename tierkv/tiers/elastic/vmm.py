"""Page backends: one virtual range reserved for a tier's maximum, physical pages mapped on demand.

The elastic device tier (`tiers/elastic.py`) keeps its slots in one range of virtual addresses
whose base never moves, so a tensor over the range handed to a kernel or an engine stays valid
for the life of the store; only which pages of it are backed by physical memory changes.

Two backends behind the same small interface:

    CudaPages   CUDA virtual memory management through cuda-python: `cuMemAddressReserve` once,
                then per page `cuMemCreate` + `cuMemMap` + `cuMemSetAccess` to map and
                `cuMemUnmap` to give the memory back to the driver (the allocation handle is
                released right after mapping, so unmapping frees the physical page)
    HostPages   an anonymous `mmap` reserved with PROT_NONE; mapping a page makes it readable
                and writable, unmapping drops its contents (`madvise(MADV_DONTNEED)`) and makes
                it inaccessible again. Touching an unmapped page faults, as on the GPU, so the
                same page policy runs, and is tested, on a machine without CUDA

Both expose the range as a 1-D uint8 torch tensor built through DLPack with an explicit device,
so torch never queries the pointer (an unmapped VMM address has no pointer attributes).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError, TierKVError
from ...ops import cuda_driver as _cuda

HOST_PAGE_BYTES = 2 << 20  # default page of the host backend: the GPU's VMM granularity


class PageError(TierKVError, RuntimeError):
    """The driver or the kernel refused to reserve, map or unmap memory; the message says which call."""


class PageBackend(ABC):
    """A reserved range of whole pages of `page_bytes` covering `num_bytes`, each page mapped or not.

    `map` and `unmap` take page numbers; `map` stops at the first page the memory runs out for
    and returns how many it mapped, so a caller that was promised memory by a budget can give
    the rest back. Mapping a mapped page or unmapping an unmapped one is a caller bug and raises.
    """

    def __init__(self, num_bytes: int, page_bytes: int) -> None:
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        self.num_pages = -(-num_bytes // page_bytes)
        self.page_bytes = page_bytes
        self.mapped = np.zeros(self.num_pages, dtype=bool)
        self._closed = False

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def mapped_pages(self) -> int:
        return int(self.mapped.sum())

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the range lives."""

    @property
    @abstractmethod
    def tensor(self) -> torch.Tensor:
        """The whole range as a 1-D uint8 tensor; only bytes of mapped pages may be touched."""

    def map(self, pages: Sequence[int]) -> int:
        """Back `pages` (in order) with physical memory; returns how many got mapped."""
        self._check(pages, want_mapped=False)
        done = 0
        for p in pages:
            if not self._map_page(int(p)):
                break
            self.mapped[p] = True
            done += 1
        return done

    def unmap(self, pages: Sequence[int]) -> None:
        """Give the physical memory of `pages` back; their bytes are lost."""
        self._check(pages, want_mapped=True)
        if not len(pages):
            return
        self._before_unmap()
        for p in pages:
            self._unmap_page(int(p))
            self.mapped[p] = False

    def close(self) -> None:
        """Unmap every page and give the virtual range back. Tensors over it must not be used after."""
        if self._closed:
            return
        self.unmap(np.flatnonzero(self.mapped).tolist())
        self._closed = True
        self._release_range()

    def _check(self, pages: Sequence[int], want_mapped: bool) -> None:
        if self._closed:
            raise PageError("the page range is closed")
        arr = np.asarray(pages, dtype=np.int64)
        if arr.size == 0:
            return
        if arr.min() < 0 or arr.max() >= self.num_pages:
            raise IndexError(f"page {int(arr.min() if arr.min() < 0 else arr.max())} is outside [0, {self.num_pages})")
        if len(np.unique(arr)) != arr.size:
            raise ValueError("a page is named twice")
        wrong = arr[self.mapped[arr] != want_mapped]
        if wrong.size:
            state = "not mapped" if want_mapped else "already mapped"
            raise ValueError(f"page {int(wrong[0])} is {state}")

    @abstractmethod
    def _map_page(self, page: int) -> bool:
        """Map one page; False when the memory ran out (nothing is left half-mapped)."""

    @abstractmethod
    def _unmap_page(self, page: int) -> None: ...

    def _before_unmap(self) -> None:
        """Wait for queued work that may still touch the pages (GPU copies)."""

    @abstractmethod
    def _release_range(self) -> None: ...


# -- a tensor over raw memory, through DLPack ---------------------------------------------------

_KDL_CPU, _KDL_CUDA, _KDL_UINT = 1, 2, 1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
        ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p), ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_CAPSULE_NAME = b"dltensor"  # the capsule keeps a pointer to this name: it must outlive every capsule


def tensor_over(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A 1-D uint8 tensor viewing `nbytes` at `address` on `device`, without a copy or a pointer query.

    The DLPack record is malloc'ed and its deleter is libc `free`: torch frees it when the last
    view of the tensor dies, with no Python callback (which could run after interpreter exit).
    The memory itself belongs to the caller, who must keep it valid while views exist.
    """
    size = ctypes.sizeof(_DLManagedTensor)
    record = _libc.malloc(size + 8)
    if not record:
        raise MemoryError("malloc of a DLPack record failed")
    ctypes.c_int64.from_address(record + size).value = nbytes
    m = _DLManagedTensor.from_address(record)
    m.dl_tensor.data = address
    if device.type == "cuda":
        m.dl_tensor.device = _DLDevice(_KDL_CUDA, device.index or 0)
    else:
        m.dl_tensor.device = _DLDevice(_KDL_CPU, 0)
    m.dl_tensor.ndim = 1
    m.dl_tensor.dtype = _DLDataType(_KDL_UINT, 8, 1)
    m.dl_tensor.shape = record + size
    m.dl_tensor.strides = None  # compact
    m.dl_tensor.byte_offset = 0
    m.manager_ctx = None
    m.deleter = ctypes.cast(_libc.free, ctypes.c_void_p).value
    return torch.from_dlpack(_capsule_new(record, _CAPSULE_NAME, None))


# -- host pages -------------------------------------------------------------------------------

_PROT_NONE, _PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _os_error(call: str) -> PageError:
    err = ctypes.get_errno()
    return PageError(f"{call} failed: {os.strerror(err)} (errno {err})")


class HostPages(PageBackend):
    """Pages of an anonymous PROT_NONE mapping, made accessible one by one."""

    def __init__(self, num_bytes: int, page_bytes: int = HOST_PAGE_BYTES) -> None:
        if page_bytes <= 0 or page_bytes % mmap.PAGESIZE:
            raise ConfigError(f"device_page_bytes: host pages must be a positive multiple of {mmap.PAGESIZE}, got {page_bytes}")
        super().__init__(num_bytes, page_bytes)
        self._length = max(self.nbytes, mmap.PAGESIZE)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        addr = _libc.mmap(None, self._length, _PROT_NONE, flags, -1, 0)
        if addr in (None, _MAP_FAILED):
            raise _os_error(f"mmap of {self._length} bytes")
        self.address: int = addr
        self._tensor = tensor_over(addr, self.nbytes, torch.device("cpu"))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def tensor(self) -> torch.Tensor:
        return self._tensor

    def _map_page(self, page: int) -> bool:
        if _libc.mprotect(self.address + page * self.page_bytes, self.page_bytes, _PROT_RW):
            if ctypes.get_errno() == 12:  # ENOMEM
                return False
            raise _os_error("mprotect")
        return True

    def _unmap_page(self, page: int) -> None:
        start = self.address + page * self.page_bytes
        if _libc.madvise(start, self.page_bytes, mmap.MADV_DONTNEED):
            raise _os_error("madvise(MADV_DONTNEED)")
        if _libc.mprotect(start, self.page_bytes, _PROT_NONE):
            raise _os_error("mprotect")

    def resident_bytes(self) -> int:
        """Bytes of the range backed by RAM right now (`mincore`): what unmapping must bring to 0."""
        if self._closed:
            return 0
        n = self._length // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * n)()
        if _libc.mincore(self.address, self._length, vec):
            raise _os_error("mincore")
        return int((np.frombuffer(memoryview(vec), dtype=np.uint8) & 1).sum()) * mmap.PAGESIZE

    def _release_range(self) -> None:
        self._tensor = self._tensor[:0]
        if _libc.munmap(self.address, self._length):
            raise _os_error("munmap")


# -- CUDA pages -------------------------------------------------------------------------------


def _check(result: Any, what: str) -> tuple:
    """Unpack a cuda.bindings result tuple; a failure raises `PageError` naming the call and the error."""
    return _cuda.check(result, what, error=PageError)


def cuda_granularity(device_index: int) -> int:
    """The minimum VMM page of a GPU (2 MiB on current NVIDIA GPUs)."""
    driver = _cuda.init(error=PageError)  # cuInit, once per process
    return int(_check(driver.cuMemGetAllocationGranularity(
        _device_prop(device_index), driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
        "cuMemGetAllocationGranularity")[0])


def _device_prop(device_index: int) -> Any:
    driver = _cuda.driver()
    prop = driver.CUmemAllocationProp()
    prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device_index
    return prop


class CudaPages(PageBackend):
    """Pages of a `cuMemAddressReserve` range on one GPU, in the primary context torch uses."""

    def __init__(self, num_bytes: int, device: torch.device, page_bytes: int | None = None) -> None:
        driver = _cuda.driver()
        if not torch.cuda.is_available():
            raise ConfigError("device_elastic on a CUDA device needs CUDA, which is not available here")
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.init()
        granularity = cuda_granularity(index)
        page_bytes = granularity if page_bytes is None else page_bytes
        if page_bytes <= 0 or page_bytes % granularity:
            raise ConfigError(
                f"device_page_bytes: must be a multiple of the GPU's VMM granularity {granularity}, got {page_bytes}"
            )
        super().__init__(num_bytes, page_bytes)
        self._device = torch.device("cuda", index)
        (self._dev,) = _check(driver.cuDeviceGet(index), "cuDeviceGet")
        (self._ctx,) = _check(driver.cuDevicePrimaryCtxRetain(self._dev), "cuDevicePrimaryCtxRetain")
        self._prop = _device_prop(index)
        access = driver.CUmemAccessDesc()
        access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = index
        access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        self._length = max(self.nbytes, page_bytes)
        self._make_current()
        (base,) = _check(driver.cuMemAddressReserve(self._length, page_bytes, 0, 0),
                         f"cuMemAddressReserve of {self._length} bytes")
        self.address = int(base)
        self._tensor = tensor_over(self.address, self.nbytes, self._device)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tensor(self) -> torch.Tensor:
        return self._tensor

    def _make_current(self) -> None:
        """Driver calls act on the calling thread's current context: make it torch's primary one."""
        driver = _cuda.driver()
        (current,) = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(current) != int(self._ctx):
            _check(driver.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def _map_page(self, page: int) -> bool:
        driver = _cuda.driver()
        self._make_current()
        ptr = self.address + page * self.page_bytes
        err, handle = driver.cuMemCreate(self.page_bytes, self._prop, 0)
        if err == driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            return False
        _check((err,), "cuMemCreate")
        try:
            _check(driver.cuMemMap(ptr, self.page_bytes, 0, handle, 0), "cuMemMap")
        finally:
            # The mapping keeps the memory alive; releasing the handle now means unmap frees it.
            _check(driver.cuMemRelease(handle), "cuMemRelease")
        try:
            _check(driver.cuMemSetAccess(ptr, self.page_bytes, self._access, 1), "cuMemSetAccess")
        except PageError:
            _check(driver.cuMemUnmap(ptr, self.page_bytes), "cuMemUnmap")
            raise
        return True

    def _before_unmap(self) -> None:
        torch.cuda.synchronize(self._device)

    def _unmap_page(self, page: int) -> None:
        self._make_current()
        _check(_cuda.driver().cuMemUnmap(self.address + page * self.page_bytes, self.page_bytes), "cuMemUnmap")

    def _release_range(self) -> None:
        driver = _cuda.driver()
        self._tensor = self._tensor[:0]
        self._make_current()
        _check(driver.cuMemAddressFree(self.address, self._length), "cuMemAddressFree")
        _check(driver.cuDevicePrimaryCtxRelease(self._dev), "cuDevicePrimaryCtxRelease")


def page_backend(num_bytes: int, device: torch.device, page_bytes: int | None) -> PageBackend:
    """The backend for `device`, with enough pages for `num_bytes`."""
    if device.type == "cuda":
        return CudaPages(num_bytes, device, page_bytes)
    if device.type == "cpu":
        return HostPages(num_bytes, HOST_PAGE_BYTES if page_bytes is None else page_bytes)
    raise ConfigError(f"device_elastic: no page backend for device {device}")
