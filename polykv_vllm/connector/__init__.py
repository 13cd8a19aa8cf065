"""The vLLM KV connector: a compressed shared-prefix tier inside a vLLM engine.

Importing this package imports neither vLLM nor torch kernels; the connector class lives in
:mod:`polykv_vllm.connector.connector` (``kv_connector_module_path``). Contract:
``docs/CONNECTOR.md``.
"""

from polykv_vllm.connector.config import PolyKVConfig, kv_transfer_config, parse_size

__all__ = ["PolyKVConfig", "kv_transfer_config", "parse_size"]
