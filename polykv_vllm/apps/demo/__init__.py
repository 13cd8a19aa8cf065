"""``python -m polykv_vllm.demo`` (``make demo``): polykv in a real vLLM server, on CPU, measured.

What it does, end to end, with nothing but this machine:

1. Starts vLLM's OpenAI-compatible server as a subprocess with the embedded SmolLM2-135M model
   (``polykv_vllm.embedded``) and the polykv connector switched on, exactly as a user would:
   ``polykv-vllm serve MODEL --kv-cache-plugin polykv`` (run as ``python -m polykv_vllm.cli``).
   vLLM's own KV cache is kept small, ``--kv-cache-docs`` documents' worth, so not every
   document fits in it.
2. Runs a multi-agent workload through the ``openai`` client: ``--documents`` documents of real
   text (Python's ``pydoc_data.topics``, ``--doc-tokens`` tokens each, cut with the server's
   tokenizer), ``--agents`` agents per document, each asking its own question, interleaved
   (agent 0 on every document, then agent 1, ...), one request at a time, greedy, streamed.
   After every request ``/metrics`` is read, so each request's prompt tokens are attributed to
   vLLM's prefix cache, the polykv store (``external_kv_transfer``) or recompute.
3. Does the same with the plugin off (plain vLLM, same KV cache size) and prints one table:
   memory (compressed store bytes against the same tokens in the engine's KV dtype, both read
   from ``vllm:polykv_*`` metrics; vLLM's KV cache size from ``vllm:cache_config_info``), TTFT of
   first reads, of revisits served from the store and of the same revisits recomputed,
   throughput, and whether the answers equal the plugin-off answers.

``--only baseline`` runs plain vLLM alone (works without the connector). Timings are whatever this
machine gives; on a shared 2-core box they vary from run to run.

Modules: :mod:`.options` (settings, the server command), :mod:`.run` (the workload against one
server), :mod:`.report` (the table), :mod:`.program` (``main``).
"""
