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


class CountingParameter(torch.nn.Parameter):
    """A parameter whose `.to` calls are counted: bitsandbytes' 4-bit weights wrap themselves again in theirs."""

    calls = 0

    def to(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        type(self).calls += 1
        return super().to(*args, **kwargs)


def test_move_to_moves_only_what_is_elsewhere() -> None:
    from plainlm.device import move_to

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_buffer("table", torch.ones(3))
    meta = torch.device("meta")  # another device that any machine has
    there = model[0].weight = CountingParameter(torch.empty(4, 4, device=meta))  # as a layer quantized on the GPU
    move_to(model, meta)
    assert {p.device for p in model.parameters()} == {meta} and model.table.device == meta
    assert model[0].weight is there and CountingParameter.calls == 0  # left as it was: not even asked to move
