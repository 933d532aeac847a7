"""The ✓ cells of the compatibility matrix that run in one process: every callback in a stock Trainer under each
setup, with hooks left = 0, frozen coordinates bit-identical and evidence that the callback acted.

The ``compile`` column uses the ``aot_eager`` backend (see ``compat_utils.COMPILE_BACKEND``), plus one
``inductor`` variant per callback (slow: C++ code generation); attribution alignment refuses AOTAutograd
backends (tested in ``test_compat_refusals.py``) and is run with ``torch_compile_backend="eager"``.
"""

from __future__ import annotations

import pytest
import torch
from compat_utils import CALLBACKS, check_result, run_scenario

pytestmark = pytest.mark.filterwarnings("ignore")

_SETUPS = ("single", "peft", "compile", "grad_ckpt", "bf16", "gpu_bf16")
_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this run")
_EXTRA = {("attribution", "compile"): {"torch_compile_backend": "eager"}}


def _cases():
    for setup in _SETUPS:
        for callback in CALLBACKS:
            extra = _EXTRA.get((callback, setup), {})
            info = {"variant": ", ".join(f"{k}={v!r}" for k, v in extra.items())} if extra else {}
            marks = [pytest.mark.compat(callback=callback, setup=setup, **info)]
            if setup == "gpu_bf16":
                marks += [pytest.mark.gpu, _GPU]
            yield pytest.param(callback, setup, extra, marks=marks, id=f"{callback}-{setup}")
    for callback in CALLBACKS:
        if callback == "attribution":
            continue  # refuses inductor (test_compat_refusals.py)
        mark = pytest.mark.compat(
            callback=callback, setup="compile", variant="torch_compile_backend='inductor'"
        )
        extra = {"torch_compile_backend": "inductor"}
        yield pytest.param(
            callback, "compile", extra, marks=[mark, pytest.mark.slow], id=f"{callback}-inductor"
        )


@pytest.mark.parametrize(("callback", "setup", "extra"), list(_cases()))
def test_callback_under_setup(callback, setup, extra, tmp_path):
    check_result(callback, run_scenario(callback, setup, tmp_path, **extra))
