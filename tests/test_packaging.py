"""videorepa.kernels is importable installed (setup.py maps kernels/) and from an uninstalled source checkout."""

import os
import subprocess
import sys
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_source_checkout_without_install():
    # -S skips site-packages' .pth files, so an editable install's import hook is not there to help.
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import videorepa, videorepa.kernels as k; "
            "import torch; print(k.__file__); print(float(videorepa.TRDLoss(backend='torch')(torch.ones(3, 2), "
            "torch.ones(3, 2))))")
    out = subprocess.run([sys.executable, "-S", "-c", code, REPO, sysconfig.get_paths()["purelib"]],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [os.path.join(REPO, "kernels", "__init__.py"), "0.0"]


def test_importing_the_loss_does_not_import_diffusers():
    code = "import sys, videorepa; from videorepa.kernels import trd_loss; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_a_top_level_kernels_import_is_the_one_copy():
    # transformers imports `kernels` (Hugging Face's package of that name) when it finds one on sys.path, which a
    # source checkout's kernels/ is. It must be videorepa.kernels itself: the loss registers global operators.
    for first in ("import videorepa.kernels; import kernels", "import kernels; import videorepa.kernels"):
        code = (f"import sys; {first}; import torch; print(sys.modules['kernels'] is sys.modules['videorepa.kernels'],"
                " sorted(m for m in sys.modules if m.startswith('kernels.')))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
        assert out.stdout.strip() == "True []", (first, out.stdout)
