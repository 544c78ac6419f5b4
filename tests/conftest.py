import os

# The Triton kernels run through Triton's interpreter on CPU; it must be on before triton.jit wraps them.
os.environ.setdefault("TRITON_INTERPRET", "1")
