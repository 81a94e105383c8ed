"""Unlabelled evaluation images for ImageNet models: random crops of the photos that ship inside
scikit-image and scikit-learn (no download).

Photos: scikit-image's astronaut, chelsea (a cat), coffee, rocket, hubble_deep_field,
immunohistochemistry, retina and camera (grey, repeated to 3 channels), scikit-learn's china
and flower. :func:`photo_crops` draws ``n`` views, cycling through the photos: a random crop of
25-100% of the area with aspect ratio 3/4-4/3, resized to ``size`` (bilinear, antialiased), a
coin-flip horizontal mirror, and brightness/contrast scaled by 0.8-1.2; then normalised with the
ImageNet mean and std. ``split="calib"`` and ``split="eval"`` use different random streams, so
calibration and evaluation see different views (of the same photos).

Output: ``(n, 3, size, size)`` float32.
"""

from __future__ import annotations

import torch

from ..models.mobilenet import MEAN, STD

__all__ = ["PHOTOS", "load_photos", "photo_crops"]

PHOTOS = (
    ("skimage", "astronaut"), ("skimage", "chelsea"), ("skimage", "coffee"), ("skimage", "rocket"),
    ("skimage", "hubble_deep_field"), ("skimage", "immunohistochemistry"), ("skimage", "retina"),
    ("skimage", "camera"), ("sklearn", "china.jpg"), ("sklearn", "flower.jpg"),
)  # fmt: skip
_SPLIT_SEED = {"calib": 1, "eval": 2}


def load_photos() -> list[tuple[str, torch.Tensor]]:
    """The photos as ``(name, (3, H, W) float32 in [0, 1])``."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_image
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the bundled photos need the 'zoo' extra: pip install 'lowbit[zoo]'") from e
    out = []
    for source, name in PHOTOS:
        img = getattr(skimage.data, name)() if source == "skimage" else load_sample_image(name)
        t = torch.tensor(img).float() / 255.0  # a copy: the arrays may be read-only
        if t.dim() == 2:
            t = t.unsqueeze(-1).expand(-1, -1, 3)
        out.append((name, t[..., :3].permute(2, 0, 1).contiguous()))
    return out


def photo_crops(n: int, *, size: int = 224, seed: int = 0, split: str = "eval") -> torch.Tensor:
    """``n`` augmented, normalised views of the photos: ``(n, 3, size, size)``."""
    if split not in _SPLIT_SEED:
        raise ValueError(f"split must be one of {', '.join(_SPLIT_SEED)}, got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    photos = load_photos()
    g = torch.Generator().manual_seed(seed * 1000 + _SPLIT_SEED[split])
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    views = []
    for i in range(n):
        img = photos[i % len(photos)][1]
        h, w = img.shape[1:]
        u = torch.rand(5, generator=g).tolist()
        area = (0.25 + 0.75 * u[0]) * h * w
        aspect = (3 / 4) * (16 / 9) ** u[1]  # log-uniform in [3/4, 4/3]
        ch = min(h, max(8, round((area / aspect) ** 0.5)))
        cw = min(w, max(8, round((area * aspect) ** 0.5)))
        top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
        crop = img[:, top : top + ch, left : left + cw].unsqueeze(0)
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
        if u[4] < 0.5:
            crop = crop.flip(-1)
        b, c = 0.8 + 0.4 * torch.rand(2, generator=g)
        crop = ((crop - crop.mean()) * c + crop.mean() * b).clamp(0, 1)
        views.append((crop - mean) / std)
    return torch.stack(views)
