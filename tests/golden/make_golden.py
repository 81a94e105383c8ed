"""Writes tests/golden/toy-v1 (format_version 1) and the outputs it must keep producing.

Run once when a format version is introduced; never regenerate an existing version's files.
    python tests/golden/make_golden.py
"""

from pathlib import Path

import torch
from safetensors.torch import save_file
from tests.conftest import Toy

import lowbit
from lowbit.recipe import Recipe

here = Path(__file__).parent
torch.manual_seed(0)
model = Toy().eval()
recipe = Recipe.from_scheme("w4g8-asym").add("emb", "w8g8").add("conv", "int8").add("fc2", "w2g8")
lowbit.quantize(model, recipe, kernel="reference")
lowbit.save(model, here / "toy-v1")
g = torch.Generator().manual_seed(1)
idx, img = torch.randint(0, 50, (2, 5), generator=g), torch.randn(2, 3, 6, 6, generator=g)
with torch.no_grad():
    out = model(idx, img)
save_file({"idx": idx, "img": img, "out": out}, str(here / "toy-v1-expected.safetensors"))
