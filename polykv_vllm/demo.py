"""``python -m polykv_vllm.demo`` (``make demo``): the README's first command.

The program lives in :mod:`polykv_vllm.apps.demo` (programs are kept apart from the library's
modules); this module only keeps the short command working.
"""

import sys

from polykv_vllm.apps.demo.program import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
