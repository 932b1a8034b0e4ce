"""ami.train: PyTorch training that reproduces the benchmark (torch, timm, peft)."""
