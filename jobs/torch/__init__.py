"""The PyTorch steps: training, evaluation and scoring (docs/contract.md, "Training, evaluation and
promotion" and "Scoring").

Two process-wide memory settings are made for the torch steps:

- when this package is first imported (``python -m jobs.torch.X`` imports it before anything
  else), numpy is told not to ask the kernel for transparent huge pages (unless the environment
  already sets ``NUMPY_MADVISE_HUGEPAGE``). numpy advises huge pages for every array of 4 MiB or more;
  where the kernel then compacts memory to find them on the first touch (``defrag`` set to
  ``madvise``, the common default, and on virtual machines most of all), a step that fills fresh
  arrays of a few GiB spends most of its time in the kernel. Scoring a 1M-row day with the sequence
  model took 5.0-5.6 s with the advice and 3.9-4.0 s without it on the 2-core benchmark machine,
  with half the system time and a lower peak. It has to be set before numpy is first imported.
- when the scoring or the training step's module is imported (``jobs.torch.score``,
  ``jobs.torch.train``: batch processes, which end with their work), glibc's allocator is told to
  keep the memory freed in the process for the next allocation (:func:`keep_freed_memory`), unless
  the environment sets ``glibc.malloc`` tunables itself. Not at this package's import: long-lived
  processes (a sensor reading the registry, the report page) import parts of it too, and they
  should hand memory back.
"""

from __future__ import annotations

import ctypes
import os

os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # mallopt parameters (malloc.h)
KEEP_FREED_BYTES = 2**31 - 1  # free memory at the top of the heap is handed back only beyond this (mallopt's largest)
HEAP_GROWTH_PAD = 64 << 20  # bytes the heap grows by beyond each request, so it grows in few steps
KEPT_FREED_MEMORY: bool | None = None  # whether keep_freed_memory's setting is in force (None: not asked yet)


def keep_freed_memory() -> bool:
    """Make glibc serve every allocation from its heap and keep what is freed there for the next one.

    By default glibc maps each block of 32 MiB or more afresh from the kernel and unmaps it on free:
    every large numpy or torch temporary then costs a page fault per 4 KiB page on its first touch,
    and the kernel zeroes each page. The sequence scorer makes a few GiB of such temporaries for a
    1M-row day: about a million faults and 1.3-1.8 s of system time on two cores. With the freed
    memory kept, the next array reuses pages already mapped (scoring that day took 2.7 s instead of
    3.2 s on the 2-core benchmark machine, with a lower peak). The cost: the process's resident
    memory does not shrink before it exits, which suits batch steps that end when their work does.

    Returns whether the setting is in force: not where the C library has no ``mallopt`` (not glibc),
    nor where ``GLIBC_TUNABLES`` already names a ``glibc.malloc`` tunable (an operator's choice).
    Made once a process.
    """
    global KEPT_FREED_MEMORY
    if KEPT_FREED_MEMORY is not None:
        return KEPT_FREED_MEMORY
    KEPT_FREED_MEMORY = False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    made = [mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES),
            mallopt(_M_TOP_PAD, HEAP_GROWTH_PAD)]
    KEPT_FREED_MEMORY = all(made)
    return KEPT_FREED_MEMORY
