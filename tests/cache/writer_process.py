"""A cache writer run as a separate process by the crash-safety and concurrency tests.

    python writer_process.py PATH FIRST STOP [DELAY] [STEP]

Writes rows range(FIRST, STOP, STEP) (skipping rows already done) with ``row_values`` content.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_testing import row_values  # noqa: E402

from cache import FeatureCache  # noqa: E402

if __name__ == "__main__":
    path, first, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    step = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    cache = FeatureCache.open(path, mode="r+")
    done = cache.done
    shape = cache.shape
    for row in range(first, stop, step):
        if not done[row]:
            cache.write_row(row, row_values(row, shape))
            print(row, flush=True)
            time.sleep(delay)
    cache.close()
