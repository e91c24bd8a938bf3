"""The kernels build wherever the CPU can run them: test_kernels.py skips every test on a CPU without
AVX512-VNNI or when the build fails, so without this check a broken build on a capable CPU would pass
the suite in silence."""

from __future__ import annotations

import pytest
import torch

from plainlm.kernels import kernels_loaded


@pytest.mark.slow  # the first call builds the kernels (a C++ compile)
@pytest.mark.skipif(not torch.cpu._is_vnni_supported(), reason="this CPU has no AVX512-VNNI: the kernels cannot run")
def test_the_kernels_build_on_a_cpu_with_avx512_vnni():
    # kernels_loaded warns with the build's error when it fails; pytest shows that warning in the summary.
    assert kernels_loaded(), "this CPU has AVX512-VNNI, yet plainlm's kernels did not build: see the warning"
