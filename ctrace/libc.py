"""This process's C library, for the few calls Python has no wrapper for. Looked up among
the symbols already loaded (dlopen(NULL)): no search for the library file, which
ctypes.util.find_library does by running ldconfig (4 ms at every start)."""

import ctypes
from typing import Any, Optional


def function(name: str) -> Optional[Any]:
    """The C library's function `name`, or None where it has none."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
