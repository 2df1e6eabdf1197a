"""The file system's cost of creating files: 3,000 empty files created with open(O_CREAT|O_EXCL),
spread over 10 existing directories, then 100 per new directory. Prints µs per create and the
process's system CPU. Shows why small-file figures (ours and rsync's) move between runs.

    .venv/bin/python tests/bench/create_cost.py [DIR]     (default: a fresh directory under /tmp)
"""

import os
import shutil
import sys
import tempfile
import time

base = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="create-cost-")
N = 3000
try:
    for variant in ("existing_dirs", "new_dirs"):
        b = os.path.join(base, variant)
        os.makedirs(b)
        if variant == "existing_dirs":
            for k in range(10):
                os.mkdir(f"{b}/d{k}")
        c0, t = os.times(), time.perf_counter()
        for i in range(N):
            if variant == "existing_dirs":
                p = f"{b}/d{i % 10}/f{i}"
            else:
                if i % 100 == 0:
                    os.mkdir(f"{b}/d{i // 100}", 0o700)
                p = f"{b}/d{i // 100}/f{i}"
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        el, c1 = time.perf_counter() - t, os.times()
        print(f"{variant}: {el / N * 1e6:.0f} µs per create, {(c1.system - c0.system) / N * 1e6:.0f} µs system CPU ({base})")
finally:
    shutil.rmtree(base, ignore_errors=True)
