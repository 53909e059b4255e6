"""Model identity: fingerprints of encoder weights and the small ``re2g_model.json`` beside them.

What is fingerprinted, and why
------------------------------
A dense index holds passage vectors made by a bi-encoder's **context encoder**. A query encoder
belongs with that index exactly when it was trained against that same context encoder: DPR
training and RAG/Re2G training keep the index (and so the context encoder) fixed while the query
encoder changes. So the fingerprint of a bi-encoder is the fingerprint of its context encoder (the
one shared encoder when ``shared_encoder=True``), and it is saved in ``re2g_model.json`` as
``fingerprint`` whenever a :class:`~re2g.models.encoders.BiEncoder` is saved. A fine-tuned query
encoder saved with the same context encoder keeps the fingerprint; a bi-encoder from another
training run, or a context encoder trained further, gets a new one, and the index refuses it.
The settings that turn token states into vectors (pooling, normalization, prefixes, the title/text
format: :class:`re2g.models.pooling.EncoderSettings`) change the vectors too, so a bi-encoder whose
settings are not DPR's recipe hashes them together with the weights' fingerprint
(``re2g.models.encoders.settings_fingerprint``; DPR's recipe keeps the weights' fingerprint alone, as
indexes built before settings existed recorded it).

The fingerprint is ``sha256`` over a few architecture fields of the config that the weights'
shapes do not pin (activation, layer-norm epsilon, ...), then, for every parameter in name order,
its name, shape and values as float32 bytes; the first 16 hex digits. Names drop the DPR wrapper
prefix (``ctx_encoder.`` / ``question_encoder.``), so equal weights hash equal whichever DPR class
holds them. Values are cast to float32 on the CPU, so the device does not matter; a model cast to
another dtype (bf16, fp16) gets a different fingerprint on purpose: its vectors differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from re2g.artifacts import KINDS, MODEL_KINDS, Manifest, read_manifest, write_manifest
from re2g.errors import ArtifactError

MODEL_META_FILE = KINDS[MODEL_KINDS[0]].file
FINGERPRINT_CHARS = 16

# Config fields that change an encoder's output without changing any weight's shape.
_CONFIG_KEYS = ("model_type", "hidden_act", "layer_norm_eps", "position_embedding_type",
                "projection_dim", "type_vocab_size")
_WRAPPER_PREFIXES = ("ctx_encoder.", "question_encoder.")


def module_fingerprint(module: torch.nn.Module) -> str:
    """Fingerprint of one module: its config fields and parameters (see the module docstring)."""
    h = hashlib.sha256()
    cfg = getattr(module, "config", None)
    cfg_part = {k: getattr(cfg, k, None) for k in _CONFIG_KEYS} if cfg is not None else {}
    h.update(json.dumps(cfg_part, sort_keys=True, default=str).encode())
    params = {}
    for name, p in module.named_parameters():
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        params[name] = p
    with torch.no_grad():
        for name in sorted(params):
            t = params[name].detach().to("cpu", torch.float32).contiguous()
            h.update(name.encode())
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.numpy().data)
    return h.hexdigest()[:FINGERPRINT_CHARS]


def encoder_fingerprint(module_or_dir: Any, **settings: Any) -> str:
    """The fingerprint a dense index stores and checks.

    * a :class:`~re2g.models.encoders.BiEncoder`: its context encoder (the shared one if shared)
      and its encoder settings (pooling, normalization, prefixes; see ``BiEncoder.fingerprint``);
    * any other ``torch.nn.Module``: that module;
    * a directory: a saved bi-encoder (``re2g_model.json``) or a Hugging Face encoder directory is
      loaded (``settings`` override its pooling etc., as ``BiEncoder.from_pretrained`` takes them)
      and fingerprinted, recomputed from the weights, never read from the json.
    """
    from re2g.models.encoders import BiEncoder

    if isinstance(module_or_dir, BiEncoder):
        return module_or_dir.fingerprint()
    if isinstance(module_or_dir, torch.nn.Module):
        return module_fingerprint(module_or_dir)
    path = Path(module_or_dir)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a model directory (expected a saved bi-encoder or an encoder checkpoint)")
    return BiEncoder.from_pretrained(path, shared=True, **settings).fingerprint()  # passages only: one tower


def read_model_meta(directory: str | Path) -> dict | None:
    """The ``re2g_model.json`` of a saved re2g model directory (kind ``biencoder``, ``reranker`` or
    ``generator`` in the one manifest schema of :mod:`re2g.artifacts`; a save from before it is
    mapped), as a dict with ``fingerprint`` (``fingerprints.encoder``, when there is one) beside the
    schema's fields; ``None`` when there is none. A malformed one is an :class:`ArtifactError`."""
    if not (Path(directory) / MODEL_META_FILE).is_file():
        return None
    m = read_manifest(directory, MODEL_KINDS)
    fingerprint = m.fingerprints.get("encoder")
    return {**m.to_dict(), **({"fingerprint": fingerprint} if fingerprint else {})}


def write_model_meta(directory: str | Path, meta: dict) -> Path:
    """Write ``re2g_model.json`` (last, after the weights: its presence marks a complete save).
    ``meta``: ``kind``, the model's settings, and ``fingerprint`` when it has one."""
    fields = dict(meta)
    fingerprint = fields.pop("fingerprint", None)
    manifest = Manifest(**fields, fingerprints={"encoder": fingerprint} if fingerprint else {})
    return Path(write_manifest(directory, manifest))
