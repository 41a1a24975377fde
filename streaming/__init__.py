"""The real-time engine (see engine.py).

The engine does all its work on one inference thread. OpenBLAS starts a pool of threads for matrix products as
small as the watermark's (32 x 11 by 11 x 626) and lets them spin, which on a busy machine made one such product
cost 100x its single-threaded time and starved the thread that must keep real time. So BLAS runs single-threaded
here: this is set before numpy is first imported (a program that imports numpy earlier sets it itself, as the
benches do).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
