"""Checkpoints of bf16 training saved as float32 (a pure file transformation).

DeepSpeed's ``bf16`` mode casts the module to bfloat16, so ``save_pretrained`` in the training loop
writes bfloat16 weights and ``config.json`` says ``dtype: bfloat16``; Transformers 5 loads a model
in the dtype its config names, so every later stage, index build and Serve replica would run in
bfloat16 -- on a CPU too, and with another encoder fingerprint than a float32 run of the same
weights. :func:`upcast_saved_weights` rewrites a saved directory in float32 (exact: every bfloat16
value is a float32 value), so a checkpoint loads the same way whatever precision trained it.
"""

from __future__ import annotations

import json
from pathlib import Path

LOW_PRECISION = ("bfloat16", "float16")


def upcast_saved_weights(directory: str | Path) -> list[str]:
    """Rewrite every ``*.safetensors`` under ``directory`` (recursively) with its bfloat16/float16
    tensors as float32, and set ``dtype``/``torch_dtype`` of each ``config.json`` beside them to
    ``float32``. Files already in float32 are left alone. Returns the files rewritten (relative paths)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = Path(directory)
    changed: list[str] = []
    for f in sorted(root.rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            metadata = st.metadata()
            tensors = {k: st.get_tensor(k) for k in st.keys()}
        if not any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors.values()):
            continue
        tensors = {k: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t for k, t in tensors.items()}
        tmp = f.with_name(f.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(f)
        changed.append(str(f.relative_to(root)))
    for cfg_file in sorted(root.rglob("config.json")):
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError):
            continue
        keys = [k for k in ("dtype", "torch_dtype") if cfg.get(k) in LOW_PRECISION]
        if keys:
            cfg.update({k: "float32" for k in keys})
            cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            changed.append(str(cfg_file.relative_to(root)))
    return changed
