"""plainlm: readable PyTorch for pretraining, finetuning and running large language models."""
