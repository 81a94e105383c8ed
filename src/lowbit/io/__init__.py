"""Storage: the native safetensors format, and exports to other runtimes' formats."""

from .safetensors_io import FORMAT_VERSION, LowbitFormatError, load, read_manifest, save

__all__ = ["save", "load", "read_manifest", "LowbitFormatError", "FORMAT_VERSION"]
