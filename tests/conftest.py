"""Test setup: kernels run under Triton's interpreter on CPU tensors (set before any kernel is decorated)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
