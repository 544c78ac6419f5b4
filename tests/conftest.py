import os

# Kernel tests run on VIDEOREPA_TEST_DEVICE (default cpu). On CPU the Triton kernels run through Triton's
# interpreter, which must be on before triton.jit wraps them; on a GPU (VIDEOREPA_TEST_DEVICE=cuda) they compile.
if os.environ.get("VIDEOREPA_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
