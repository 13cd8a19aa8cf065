"""``python -m polykv_vllm.apps.demo`` (the same program as ``python -m polykv_vllm.demo``)."""

import sys

from polykv_vllm.apps.demo.program import main

if __name__ == "__main__":
    sys.exit(main())
