"""CRC-32 as zlib computes it (the recording format's checksum), from libdeflate when the
system has it (Debian package libdeflate0): the same values, about four times faster on
CPUs with carry-less multiply (11 against 2.6 GB/s measured here, docs/PERFORMANCE.md).
Without it, zlib's. Checking CRCs was a fifth of what `ctrace report` spends.
"""

import ctypes
import zlib
from typing import Any, Callable, Optional

_LIBRARY = "libdeflate.so.0"
_CHECK = b"123456789"  # the CRC catalogue's check input: CRC-32 0xCBF43926
_FAST_FROM = 4096  # bytes; below this zlib's call costs less than a ctypes call

_Fast = Callable[[int, Any, int], int]


def _libdeflate() -> Optional[_Fast]:
    """libdeflate_crc32(crc, buffer, len), if the library loads and agrees with zlib."""
    try:
        fn = ctypes.CDLL(_LIBRARY).libdeflate_crc32
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    if fn(0, _CHECK, len(_CHECK)) != zlib.crc32(_CHECK) or fn(7, _CHECK, 4) != zlib.crc32(_CHECK[:4], 7):
        return None
    return fn  # type: ignore[no-any-return]


_fast: Optional[_Fast] = _libdeflate()


def use_zlib() -> None:
    """Check with zlib from now on (benchmarks compare the two)."""
    global _fast
    _fast = None


def implementation() -> str:
    return "libdeflate" if _fast is not None else "zlib"


def crc32(data: Any, value: int = 0) -> int:
    """zlib.crc32(data, value) for bytes or any C-contiguous buffer. ctypes releases the
    GIL during the call, as zlib does for large buffers, so a reading thread still
    overlaps the caller's work."""
    fast = _fast
    if fast is None:
        return zlib.crc32(data, value)
    if isinstance(data, bytes):
        n = len(data)
        return fast(value, data, n) if n >= _FAST_FROM else zlib.crc32(data, value)
    view = memoryview(data)
    n = view.nbytes
    if n < _FAST_FROM or view.readonly or not view.c_contiguous:
        return zlib.crc32(view, value)
    return fast(value, ctypes.addressof(ctypes.c_char.from_buffer(view)), n)  # type: ignore[no-any-return]
