"""polykv_vllm's additions to vLLM's OpenAI server: documents registered once and referenced by id.

- :mod:`.registry`: the canonical token prefixes by ``(tenant, doc_id)``, persisted atomically
  (standard library only);
- :mod:`.documents_api`: the ASGI middleware (vLLM's ``--middleware``) serving
  ``/v1/polykv/documents`` and rewriting by-reference completions and chat requests.

``docs/DOCUMENTS.md`` describes the routes. Importing this package starts nothing.
"""

from polykv_vllm.server.registry import DocumentRecord, Registry, RegistryError

__all__ = ["MIDDLEWARE", "DocumentRecord", "Registry", "RegistryError"]

#: the ``--middleware`` import path that ``--kv-cache-plugin polykv`` adds to the server
MIDDLEWARE = "polykv_vllm.server.documents_api.DocumentsMiddleware"
