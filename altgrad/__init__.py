"""altgrad: which 8-bit floating-point format trains a transformer best, and what fails first.

Data flows one way: formats → quantize/scaling → quantized layers → trainer → sweep → analysis.
"""

from altgrad.formats import FPFormat, get_format

__all__ = ["FPFormat", "get_format"]
__version__ = "0.1.0"
