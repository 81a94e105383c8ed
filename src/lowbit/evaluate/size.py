"""Byte-exact size accounting: per layer and for the whole model.

Quantized layers count their stored codes, scales and zero points (:attr:`QWeight.nbytes`), pruned
ones their mask and only the kept codes (:attr:`QuantModule.nbytes`);
float layers count their parameters; tensors shared between modules (tied embeddings) count
once. The totals equal what :func:`lowbit.save` writes as tensor data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..nn import QuantModule

__all__ = ["SizeReport", "LayerSize", "size_of", "fp32_bytes"]


@dataclass
class LayerSize:
    name: str
    type: str
    scheme: str  # "float32"/"bfloat16"/... for float layers
    kernel: str
    numel: int  # weight elements
    bytes: int  # stored weight bytes (codes + scales + zeros)
    bias_bytes: int = 0  # the bias, plus a static activation scale (4 bytes) and zero point (1)
    sparsity: float = 0.0  # fraction of the weight pruned (its mask is counted in ``bytes``)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.numel if self.numel else 0.0


@dataclass
class SizeReport:
    layers: list[LayerSize] = field(default_factory=list)
    total_bytes: int = 0  # every unique parameter and persistent buffer
    total_params: int = 0  # elements those tensors stand for (quantized weights at full count)

    @property
    def quantized(self) -> list[LayerSize]:
        return [r for r in self.layers if r.kernel != "-"]

    @property
    def quantized_numel(self) -> int:
        return sum(r.numel for r in self.quantized)

    @property
    def quantized_bytes(self) -> int:
        return sum(r.bytes for r in self.quantized)

    @property
    def quantized_bits_per_weight(self) -> float:
        n = self.quantized_numel
        return 8.0 * self.quantized_bytes / n if n else 0.0

    @property
    def quantized_compression(self) -> float:
        """FP32 bytes of the quantized layers' weights over their stored bytes."""
        b = self.quantized_bytes
        return 4.0 * self.quantized_numel / b if b else 1.0

    def to_dict(self) -> dict:
        return {
            "total_bytes": self.total_bytes,
            "total_params": self.total_params,
            "quantized_numel": self.quantized_numel,
            "quantized_bytes": self.quantized_bytes,
            "quantized_bits_per_weight": self.quantized_bits_per_weight,
            "quantized_compression_vs_fp32": self.quantized_compression,
            "layers": [
                {
                    "name": r.name,
                    "type": r.type,
                    "scheme": r.scheme,
                    "kernel": r.kernel,
                    "numel": r.numel,
                    "bytes": r.bytes,
                    "bits_per_weight": r.bits_per_weight,
                    "sparsity": r.sparsity,
                }
                for r in self.layers
            ],
        }


def fp32_bytes(model: nn.Module) -> int:
    """Bytes the model's unique tensors would take in float32 (quantized weights at full size)."""
    return 4 * size_of(model).total_params


def size_of(model: nn.Module) -> SizeReport:
    """Per-layer and total stored bytes of ``model``."""
    rep = SizeReport()
    seen: set[int] = set()

    def once(t) -> bool:
        if t is None:
            return False
        key = t.data_ptr() if t.device.type != "meta" else id(t)  # (meta tensors have no storage: all at 0)
        if key in seen and t.numel():
            return False
        seen.add(key)
        return True

    for name, mod in model.named_modules():
        if isinstance(mod, QuantModule):
            qw, nbytes = mod.qw, mod.nbytes
            stored = nbytes if once(mod.qweight) else 0  # row-layout bytes, as saved
            bias = mod.bias.numel() * mod.bias.element_size() if mod.bias is not None and once(mod.bias) else 0
            # static activations: a float32 scale and an int8 zero point, counted with the bias
            act_bytes = sum(t.numel() * t.element_size() for t in (mod.act_scale, mod.act_zero) if t is not None)
            rep.layers.append(
                LayerSize(name, type(mod).__name__, str(mod.scheme), mod.kernel, qw.numel, nbytes, bias + act_bytes,
                          mod.sparsity)  # fmt: skip
            )
            rep.total_bytes += stored + bias + act_bytes
            rep.total_params += (qw.numel if stored else 0) + (mod.bias.numel() if bias else 0)
            continue
        params = [p for p in mod.parameters(recurse=False) if p is not None]
        own = [p for p in params if once(p)]
        buffers = [b for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set]
        own_buf = [b for b in buffers if once(b)]
        rep.total_bytes += sum(t.numel() * t.element_size() for t in own + own_buf)
        rep.total_params += sum(t.numel() for t in own + own_buf if t.is_floating_point())
        weights = [p for n, p in mod.named_parameters(recurse=False) if p is not None and p.dim() >= 2]
        if weights and name:
            w = weights[0]
            rep.layers.append(
                LayerSize(name, type(mod).__name__, str(w.dtype).replace("torch.", ""), "-", w.numel(),
                          w.numel() * w.element_size())  # fmt: skip
            )
    return rep
