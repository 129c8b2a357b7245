"""Optional native helpers, built from C source at first use (see loader.py)."""
from edgeinfer.native.loader import load_fastread

__all__ = ["load_fastread"]
