"""`plainlm quantize`'s GPTQ and AWQ directories in transformers: they load there (through gptqmodel) with the logits
plainlm gives them.

    python benchmarks/gptq_transformers.py [--env benchmarks/.venv-gptq] [--cases rtn4,gptq4,rtn8,awq4]

SmolLM2-135M-Instruct (the packaged GGUF) is quantized by `plainlm quantize` in each case (4-bit round-to-nearest,
4-bit GPTQ with act order, whose g_idx is out of order, 8-bit round-to-nearest, and 4-bit AWQ, groups of 64), then
loaded by transformers' `AutoModelForCausalLM.from_pretrained` in float32 in a venv of its own, since gptqmodel, which
transformers' GPTQ loading needs, imports torchvision, and PyPI's torchvision does not import beside the CPU
torch 2.13 that plainlm pins: the venv (git-ignored) holds torch 2.14.1, torchvision 0.29.1, transformers,
accelerate (which its AWQ loading asks for) and gptqmodel built without CUDA, and is made by the first run.

Compared on one batch: transformers' logits against plainlm's model with its dequantized weights rounded to
fp16 (gptqmodel's kernels compute with fp16 weights: plainlm keeps them exact in float32), which should be
equal, and against plainlm's own kernels (int8-rounded activations), which differ within their tolerance.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plainlm.api import LLM  # noqa: E402
from plainlm.gptq import quantize  # noqa: E402
from plainlm.packaged_models import smollm2_gguf  # noqa: E402
from plainlm.quantize import dequantize_model  # noqa: E402

TRANSFORMERS = f"transformers=={transformers.__version__}"  # the version the tests use
PEER = ["torch==2.14.1", "torchvision==0.29.1", TRANSFORMERS, "optimum>=1.24", "accelerate", "requests"]
GPTQMODEL = "gptqmodel==7.7.0"
CALIBRATION = REPO / "data" / "pretrain" / "stories-1.txt"
CASES = {
    "rtn4": dict(method="rtn", bits=4),
    "gptq4": dict(method="gptq", bits=4, act_order=True, calibration=CALIBRATION, samples=16, length=256),
    "rtn8": dict(method="rtn", bits=8, sym=True),
    "awq4": dict(method="awq", bits=4, calibration=CALIBRATION, samples=16, length=256),
}
# Run in the peer's venv: load the directory in float32, write the logits of the saved ids.
THEIRS = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, device_map="cpu").eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
print(type(model.model.layers[0].self_attn.q_proj).__name__)
"""


def make_env(env: Path) -> Path:
    python = env / "bin" / "python"
    if not (env / ".ready").exists():
        print(f"building {env}: {', '.join(PEER)}, {GPTQMODEL} (no CUDA; a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *PEER, "setuptools", "wheel"], check=True)
        build = {"BUILD_CUDA_EXT": "0", "CUDA_VISIBLE_DEVICES": "", "PATH": f"{env / 'bin'}:/usr/bin:/bin"}
        subprocess.run([*pip, "--no-build-isolation", GPTQMODEL], check=True, env=build)
        (env / ".ready").touch()
    return python


def fp16_weights(model: torch.nn.Module) -> torch.nn.Module:
    """The blocks' Linear weights rounded to fp16, in place: what gptqmodel's kernels multiply with."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("blocks"):
                module.weight.copy_(module.weight.half().float())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", type=Path, default=REPO / "benchmarks" / ".venv-gptq")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    python = make_env(args.env)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for case in args.cases.split(","):
            directory = work / case
            quantize(smollm2_gguf(), directory, group_size=64, **CASES[case])
            llm = LLM.load(directory, device="cpu")
            ids = torch.tensor([llm.tokenizer.encode(CALIBRATION.read_text()[:2000])[:96]])
            torch.save(ids, work / "ids.pt")
            done = subprocess.run(
                [str(python), "-c", THEIRS, str(directory), str(work / "ids.pt"), str(work / "theirs.pt")],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            theirs = torch.load(work / "theirs.pt")
            with torch.no_grad():
                kernels = llm.model(ids)
                exact = fp16_weights(dequantize_model(llm.model, torch.float32))(ids)
            scale = exact.abs().max().item()
            rows.append(
                f"| {case} | {done.stdout.split()[-1]} | {(theirs - exact).abs().max().item():.1e} | "
                f"{(theirs - kernels).abs().max().item() / scale:.2%} |"
            )
            print(rows[-1], flush=True)
    print("\n| case | transformers' layer | max diff vs plainlm's weights | vs plainlm's kernels (of the largest) |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
