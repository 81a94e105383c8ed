"""Shared fixtures. Real models come from the offline zoo (see lowbit.models.zoo)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():
    # The GPU kernels' tests (tests/test_triton.py) run on CPU tensors through Triton's
    # interpreter; Triton reads this when it is imported, so it is set before anything can.
    # lowbit never picks a GPU kernel for a CPU weight unless one is named, so nothing else changes.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["avx512", "avx2", "portable"])
def isa(request):
    """Each CPU kernel ISA in turn, made active for the test; skipped (naming what is missing)
    where this machine cannot run it. The automatic choice is restored afterwards."""
    from lowbit.kernels import cpu

    reason = cpu.isa_reason(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} kernels cannot run here: {reason.splitlines()[0]}")
    cpu.use_isa(request.param)
    yield request.param
    cpu.use_isa(None)


@pytest.fixture(scope="session")
def digits():
    from lowbit.models.zoo import digits_data, load_model

    return load_model("digits-cnn"), digits_data()


@pytest.fixture(scope="session")
def smollm2():
    from lowbit.models.zoo import load_model

    return load_model("smollm2-135m")


class Toy(torch.nn.Module):
    """Every module kind the driver meets: Linear, Conv2d, Embedding, a norm, an unsupported Conv1d.

    Frozen: tests/golden/toy-v1 was written from this class and must keep loading into it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 40)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(40)
        self.fc1 = torch.nn.Linear(40, 72)
        self.fc2 = torch.nn.Linear(72, 24, bias=False)
        self.conv1d = torch.nn.Conv1d(4, 4, 3)

    def forward(self, idx: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(self.norm(self.emb(idx)))))  # (B, T, 24)
        c = self.conv(img).mean((2, 3))  # (B, 8)
        return h.mean(1)[:, :8] + c


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return Toy().eval()


@pytest.fixture
def toy_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (2, 5), generator=g), torch.randn(2, 3, 6, 6, generator=g)


def tied_quantized_pair() -> torch.nn.Sequential:
    """An embedding and an LM head sharing one weight, both quantized w4g32 (one stored tensor),
    kernels chosen as lowbit.quantize chooses them."""
    import lowbit

    emb = torch.nn.Embedding(64, 32)
    head = torch.nn.Linear(32, 64, bias=False)
    head.weight = emb.weight
    model = torch.nn.Sequential(emb, head)
    spec = lowbit.Recipe(lowbit.parse_scheme("w4g32"))
    spec.add("0", "w4g32")
    spec.add("1", "w4g32")
    return lowbit.quantize(model, spec)
