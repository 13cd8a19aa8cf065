"""Programs built on the library, and the serving harness they share.

Nothing in ``polykv_vllm.core``, ``kernels``, ``hf`` or ``connector`` imports this package; it
imports them. It is a package (not a folder of scripts beside the library) so that
``python -m polykv_vllm.demo`` works from an installed wheel as well as from a checkout, and so
that the tests and ``benchmarks/`` import the same harness without path tricks.

- :mod:`.serving`: start ``polykv-vllm serve`` on the embedded model, wait for it, stop it,
  read ``/metrics``.
- :mod:`.workload`: the shared documents (``pydoc_data.topics``), questions and prompts.
- :mod:`.demo`: ``make demo`` (``python -m polykv_vllm.demo``).
- :mod:`.hf_demo`: ``make fallback-demo``.
- :mod:`.measure`: in-process TTFT / load / store / bytes of the connector.

Importing it starts nothing and imports nothing heavy.
"""
