"""Small GPU-readiness rules checked on the CPU: the GPU a process takes, MFU's peak by dtype, --deterministic."""

import torch

from gptrain.train import distributed, metrics
from test_train import SeqLoader, small_cfg, tokens


def test_each_process_takes_local_rank_modulo_the_gpus_it_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a launcher that shows each process one GPU
    assert [distributed.cuda_device(r) for r in range(3)] == ["cuda:0"] * 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert distributed.cuda_device(11) == "cuda:3" and distributed.cuda_device(5) == "cuda:5"


def test_mfu_is_against_the_peak_of_the_dtype_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert metrics.peak_flops("cuda:0") == metrics.peak_flops("cuda:0", torch.bfloat16) == 989e12
    assert metrics.peak_flops("cuda:0", torch.float32) == 989e12 / 2  # TF32 tensor cores
    assert metrics.peak_flops("cpu", torch.float32) is None


def test_deterministic_switches_torch_to_deterministic_algorithms():
    from gptrain.model import GPT, GPTConfig
    from gptrain.train.trainer import Trainer
    from gptrain.devices import deterministic_algorithms
    try:
        model = GPT(GPTConfig(block_size=32, vocab_size=1024, n_layer=1, n_head=2, n_embd=32))
        trainer = Trainer(small_cfg(deterministic=True), model, SeqLoader(tokens(vocab=1024), 2, 16))
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        trainer.train_step()  # runs (ops without a deterministic version would only warn)
    finally:
        deterministic_algorithms(False)
    assert not torch.are_deterministic_algorithms_enabled()
