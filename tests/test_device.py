"""--device and --dtype: resolved in one place, and a device that is not there is one clear error."""

from __future__ import annotations

import pytest
import torch

from plainlm.device import resolve_device, resolve_dtype
from plainlm.errors import InvalidInput


def test_known_devices_and_dtypes_resolve() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype(None, torch.device("cpu")) is torch.float32


@pytest.mark.parametrize(
    ("device", "message"),
    [("xyz", "not a device; use cpu, cuda or cuda:N"), ("meta", "plainlm runs on cpu or cuda")]
    + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device"), ("cuda:1", "no CUDA device")]),
)
def test_a_device_that_is_not_here_is_one_error_naming_the_flag(device: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        resolve_device(device)
    assert str(caught.value).startswith(f"--device {device}:")


def test_an_unknown_dtype_names_the_ones_there_are() -> None:
    with pytest.raises(InvalidInput, match="--dtype float8: unknown; use one of float32, fp32, bfloat16"):
        resolve_dtype("float8", torch.device("cpu"))


def test_loading_and_joining_resolve_the_device_the_same_way(tmp_path) -> None:
    from plainlm import distributed
    from plainlm.api import LLM

    # The device is checked before anything is read: the path need not hold a checkpoint.
    with pytest.raises(InvalidInput, match="^--device xyz: not a device"):
        LLM.load(tmp_path, device="xyz")
    with pytest.raises(InvalidInput, match="^--device meta: plainlm runs on cpu or cuda"):
        distributed.joined("auto", "meta").__enter__()
    with distributed.joined("auto", "cpu") as world:
        assert world.device == torch.device("cpu")
