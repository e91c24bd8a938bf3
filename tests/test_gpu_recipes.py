"""Recipes for GPUs this machine does not have: every recipe under recipes/finetune/ whose header names its
hardware (`# target: NAME x N`) fits that card by `plainlm estimate --target`; the table of cards (gpus.py)
and its matching of the names torch gives devices; --target's output and errors. Estimates only: Configs, no
weights, so each recipe takes about a second."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO

from plainlm.errors import InvalidInput
from plainlm.estimate import estimate_command, estimate_command_result, parse_training_recipe, recipe_target
from plainlm.gpus import GPUS, gpu_spec, spec_for_device_name
from plainlm.memory import format_bytes

FINETUNE = REPO / "recipes" / "finetune"
RECIPES = sorted(path for path in FINETUNE.glob("*/*.yaml") if recipe_target(path))
SMOLLM2_LORA = str(FINETUNE / "smollm2-135m-instruct" / "lora.yaml")  # precision auto, no target
# A recipe must fit in this share of its card: the driver keeps some memory back (torch sees 615 MiB less of an
# H200 than nvidia-smi's total, measured), and the CUDA side of the memory plan is not measured on a GPU here.
HEADROOM = 0.95


def test_the_gpu_recipes_name_their_target() -> None:
    shipped = {path.relative_to(FINETUNE).as_posix() for path in RECIPES}
    assert shipped == {
        "llama-3.1-8b/lora.yaml",
        "llama-3.1-8b/qlora.yaml",
        "llama-3.1-8b/full.yaml",
        "llama-3.3-70b/lora.yaml",
        "llama-3.3-70b/qlora.yaml",
        "qwen3-8b/lora.yaml",
        "gpt-oss-20b/lora.yaml",
    }


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.relative_to(FINETUNE).as_posix())
def test_recipe_fits_the_gpu_its_header_names(recipe: Path) -> None:
    name, processes = recipe_target(recipe)
    card = gpu_spec(name)
    cfg, kind = parse_training_recipe(["--config", str(recipe)])  # finetune's own parser: the run takes it as it is
    assert kind == "finetune" and cfg.devices * cfg.num_nodes == processes, (
        f"{recipe.name}: its header says {processes} x {name}, its keys run {cfg.devices} x {cfg.num_nodes} processes"
    )
    estimate = estimate_command_result(["--config", str(recipe), "--target", name])
    assert (estimate.device, estimate.world_size) == ("cuda", processes)
    assert estimate.precision in ("bf16-true", "bf16-mixed") and estimate.activation_checkpointing
    assert estimate.peak <= HEADROOM * card.memory_bytes, (
        f"{recipe.relative_to(REPO)}: peak {format_bytes(estimate.peak)} per GPU (training step "
        f"{format_bytes(estimate.step_peak)}, export {format_bytes(estimate.export_peak)}), {name} has "
        f"{format_bytes(card.memory_bytes)}, of which {HEADROOM:.0%} is {format_bytes(HEADROOM * card.memory_bytes)}"
    )


def test_target_plans_with_the_cards_memory_and_bf16() -> None:
    a100 = GPUS["a100-80gb"]
    text = estimate_command(["--config", SMOLLM2_LORA, "--target", "a100-80gb", "--devices", "2"])
    assert text.startswith("target: 2 x a100-80gb (NVIDIA A100 80GB: 80.00 GiB, 312 TFLOP/s dense bf16"), text
    assert "memory per device (cuda, bf16-mixed, micro batch 4 x 256 tokens, ddp, 2 process(es))" in text
    assert f"of {format_bytes(a100.memory_bytes)} on one a100-80gb" in text and "fits:" in text
    l4 = estimate_command(["--config", SMOLLM2_LORA, "--target=l4"])
    assert "fits: " in l4 and "of 22.49 GiB on one l4" in l4


def test_target_that_does_not_fit_says_what_would() -> None:
    recipe = str(FINETUNE / "llama-3.1-8b" / "lora.yaml")
    big = ["--train.micro_batch_size", "8", "--train.global_batch_size", "16"]
    text = estimate_command(["--config", recipe, "--target", "a10g", *big])
    assert "does not fit: needs" in text and "22.49 GiB on one a10g" in text
    assert "try: halve train.micro_batch_size: peak" in text and "try: use method qlora" in text
    # Without --target the recipe's header is a hint (this machine has no GPU, so the plan is for its CPU).
    assert "the recipe is written for 1 x a10g: --target a10g plans for that card here" in estimate_command(
        ["--config", recipe]
    )


@pytest.mark.parametrize("argv", [["--target", "rtx-9090"], ["--target=a100"], ["--target"]])
def test_an_unknown_target_is_one_error_listing_the_cards(argv: list[str]) -> None:
    with pytest.raises(InvalidInput) as caught:
        estimate_command(["--config", SMOLLM2_LORA, *argv])
    message = str(caught.value)
    assert message.startswith("--target") and all(name in message for name in GPUS), message


@pytest.mark.parametrize(
    ("device_name", "card"),
    [
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", None),  # the PCIe card: a lower peak than the SXM's
        ("NVIDIA H100 80GB HBM3", "h100-80gb"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA A10", None),  # not the A10G
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L40", None),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("NVIDIA GeForce RTX 3090", "rtx-3090"),
        ("NVIDIA GeForce RTX 3090 Ti", None),
        ("NVIDIA B200", "b200"),
        ("AMD Instinct MI300X", "mi300x"),
        ("Tesla T4", None),
    ],
)
def test_device_names_match_one_card(device_name: str, card: str | None) -> None:
    spec = spec_for_device_name(device_name)
    assert (spec.name if spec else None) == card


def test_every_card_is_in_bytes_and_flops_per_second() -> None:  # a figure in GB, MiB or TFLOP/s fails here
    for spec in GPUS.values():
        assert 20 * 2**30 < spec.memory_bytes < 200 * 2**30, spec
        assert 50e12 < spec.bf16_flops < 3e15 and 2e11 < spec.memory_bandwidth < 1e13, spec


def test_a_target_line_is_read_from_the_leading_comments_only(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# LoRA on a model\n# target: h100-80gb x 4\ncheckpoint_dir: x\n")
    assert recipe_target(recipe) == ("h100-80gb", 4)
    recipe.write_text("# LoRA on a model\ncheckpoint_dir: x\n# target: h100-80gb x 4\n")
    assert recipe_target(recipe) is None
    recipe.write_text("# target: h100-80gb\ncheckpoint_dir: x\n")  # without its count: not a target line
    assert recipe_target(recipe) is None
