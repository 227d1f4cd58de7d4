"""cffi build of ``nbd_uring._uring``: a thin C layer over the system liburing.

setuptools calls ``ffibuilder`` through ``cffi_modules`` in setup.py. Importing it only
probes for liburing's header, so a missing ``liburing-dev`` stops the build with one sentence
instead of a compiler traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CSRC = HERE / "nbd_uring" / "_csrc"

CDEF_EXTRA = """
struct __kernel_timespec { ...; };
#define IORING_FSYNC_DATASYNC ...
#define IORING_OP_READ ...
#define IORING_OP_WRITE ...
#define IORING_OP_FSYNC ...
#define IORING_OP_FALLOCATE ...
#define IORING_OP_FADVISE ...
#define FALLOC_FL_KEEP_SIZE ...
#define FALLOC_FL_PUNCH_HOLE ...
#define FALLOC_FL_ZERO_RANGE ...
#define RWF_DSYNC ...
#define POSIX_FADV_WILLNEED ...
"""

SOURCE_PREAMBLE = """
#include <fcntl.h>
#include <linux/falloc.h>
#include <liburing.h>
#include "nbdu.h"
"""


def _liburing_present() -> bool:
    """Compile a one-line probe so a missing liburing-dev gives one clear sentence."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return True  # let setuptools report the missing compiler itself
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.c"
        probe.write_text("#include <liburing.h>\nint main(void) { return 0; }\n")
        result = subprocess.run(
            [cc, "-E", str(probe), "-o", os.devnull],
            capture_output=True,
            check=False,
        )
    return result.returncode == 0


def _make_ffibuilder() -> FFI:
    builder = FFI()
    builder.cdef((CSRC / "nbdu.h").read_text() + CDEF_EXTRA)
    builder.set_source(
        "nbd_uring._uring",
        SOURCE_PREAMBLE,
        sources=["nbd_uring/_csrc/nbdu.c", "nbd_uring/_csrc/lane.c"],
        include_dirs=["nbd_uring/_csrc"],
        libraries=["uring"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    )
    return builder


if not os.environ.get("NBD_URING_SKIP_PROBE") and not _liburing_present():
    sys.exit(
        "nbd-uring needs liburing's headers to build: install them with "
        "'apt-get install liburing-dev' (Debian/Ubuntu) and run pip again."
    )

ffibuilder = _make_ffibuilder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
