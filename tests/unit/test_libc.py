"""The C library functions ctrace calls through ctypes are found, and the thread name takes effect."""

import os
import time

from ctrace import libc
from ctrace.exporter import THREAD_NAME, MetricsServer


def test_missing_functions_are_none():
    assert libc.function("no_such_function_in_any_libc") is None
    assert libc.function("mallopt") is not None


def test_the_exporter_thread_is_named_for_the_kernel():
    server = MetricsServer(port=0).start()
    try:
        deadline = time.monotonic() + 5
        names = []
        while THREAD_NAME not in names and time.monotonic() < deadline:
            names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
            time.sleep(0.01)
        assert THREAD_NAME in names, names
    finally:
        server.close()
