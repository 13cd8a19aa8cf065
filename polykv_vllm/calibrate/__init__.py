"""``polykv-vllm calibrate``: layer-wise codec profiles measured on real text.

:func:`calibrate` measures each layer's key/value sensitivity (:mod:`.measure`, needs
transformers) and allocates a byte budget (:mod:`.allocate`, pure Python); the result is a
:class:`polykv_vllm.core.CodecProfile`. Importing this package imports torch and transformers.
"""

from polykv_vllm.calibrate.allocate import Choice, allocate_greedy, allocate_knapsack
from polykv_vllm.calibrate.command import calibrate, main
from polykv_vllm.calibrate.measure import measure_sensitivity, model_fingerprint, prefill_windows

__all__ = [
    "Choice",
    "allocate_greedy",
    "allocate_knapsack",
    "calibrate",
    "main",
    "measure_sensitivity",
    "model_fingerprint",
    "prefill_windows",
]
