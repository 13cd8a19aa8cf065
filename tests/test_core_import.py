"""polykv_vllm.core depends on torch only: importing it pulls in neither transformers nor vllm."""

from __future__ import annotations

import json
import subprocess
import sys


def test_core_import_is_torch_only() -> None:
    code = (
        "import sys, json; import polykv_vllm.core as c; "
        "c.KVCodec('polykv'); "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('transformers', 'vllm'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_public_names() -> None:
    import polykv_vllm.core as core

    assert set(core.__all__) >= {"KVCodec", "PackedKV", "CodecConfig", "PRESETS", "LayerSpec"}
    for name in core.__all__:
        assert hasattr(core, name)
