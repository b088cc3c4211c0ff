"""The PyTorch steps: training, evaluation and scoring (docs/contract.md, "Training, evaluation and
promotion" and "Scoring").

Their processes tell numpy not to ask the kernel for transparent huge pages (unless the environment
already sets ``NUMPY_MADVISE_HUGEPAGE``). numpy advises huge pages for every array of 4 MiB or more;
where the kernel then compacts memory to find them on the first touch (``defrag`` set to
``madvise``, the common default, and on virtual machines most of all), a step that fills fresh
arrays of a few GiB spends most of its time in the kernel. Scoring a 1M-row day with the sequence
model took 5.0-5.6 s with the advice and 3.9-4.0 s without it on the 2-core benchmark machine, with
half the system time and a lower peak. Set before numpy is first imported: ``python -m jobs.torch.X``
imports this package first.
"""

import os

os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
