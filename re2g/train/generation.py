"""Stage 2 (generation, RAG) and stage 4 (end-to-end) for the one training loop of ``re2g.train.loop``.

**Stage 2** (:class:`GenerationStage`): the query encoder and the generator trained together on the target
outputs. For each query, ``q`` is encoded *with* gradient; its detached copy searches the dense index
held by the index-shard Ray actors (DPR top-n; the index is never copied into a worker); the stored
vectors ``p`` of the hits come back from the same actors (``get_vectors``), so the document scores
``q . p`` (B, n) carry gradient to the query encoder only. The context encoder is frozen and the
index stays fixed (as in RAG and Re2G). Loss: ``marginal_loss`` (RAG-Sequence or RAG-Token) over the
per-passage target log-probabilities (B, n, T).

**Stage 4** (:class:`E2EStage`): per query DPR top-12 (actors) + BM25 top-12 (fixed, retrieved once
by the driver) fused as serving fuses them (``re2g.index.fusion.fuse``) -> the reranker scores every
candidate (B, C) -> its top-5 (``rerank_top``; a shorter list keeps all it has) go to BART; the
reranker's scores weight the marginalization, so the generator's loss trains the reranker. The query
encoder gets no gradient through that; ``query_encoder`` chooses what it does:

* ``combined``: document scores ``log_softmax(z_dpr) + log_softmax(z_rerank)`` over the top-5;
* ``frozen``: the query encoder is not updated (not in the optimizer, no gradient; bitwise unchanged);
* ``distill``: ``+ weight * distill_kl(z_rerank, z_dpr, T)`` over *all* candidates, BM25 hits
  included (their DPR scores from their stored vectors).

Dev evaluation (rank 0, same retrieval path): answers decoded as ``cfg.generation`` says, scored with
KILT's official metrics (``re2g.eval.kilt``): EM, F1, accuracy and page-level R-Precision /
Recall@5 of the provenance; stage 4 also the dev KL between the reranker's and DPR's distributions
over the candidates and the DPR top-k's own page R-Precision. The metrics of a checkpoint's step are
written beside it (``eval.json``); the driver adds the before/after table (``re2g.train.api.run_stage``).

Models: :class:`Re2GModel` holds the bi-encoder (query encoder trained, context encoder frozen and
saved unchanged, so the saved bi-encoder still matches the index's fingerprint), the generator and
(stage 4) the reranker; saved as ``biencoder/``, ``generator/``, ``reranker/`` under
``RUN_DIR/models/generator`` (stage 2) and ``RUN_DIR/models/e2e-<option>`` (stage 4).

The generator is either kind: a seq2seq LM (BART, T5) or a decoder-only causal LM
(``re2g.models.causal.CausalGenerator``; the tiny one from config with
``models.tiny.generator_arch: llama``). Both give the per-passage target log-probabilities (B, n, T)
that the same pure marginalization functions take; loading goes through
``re2g.models.causal.load_any_generator`` (``models.generator_kind``). With ``train.generator.lora`` /
``train.e2e.lora`` a causal reader trains LoRA adapters only (``re2g.models.lora``), saved merged into a
plain directory or kept as an adapter directory over its base. DeepSpeed ZeRO-3 works for full
fine-tuning (rank 0 saves and evaluates with the parameters gathered).

Where it lives (this module re-exports the public names):

* :mod:`re2g.train.rag_model` -- :class:`Re2GModel` and its loading;
* :mod:`re2g.train.rag_steps` -- retrieval inside training (index handle, candidates, scores) and
  the losses of one micro-batch (:func:`rag_step`, :func:`e2e_step`);
* :mod:`re2g.train.rag_eval` -- dev evaluation and the result tables;
* :mod:`re2g.train.rag_stages` -- the two stage classes and the micro-batch plan;
* :mod:`re2g.train.rag_driver` -- the entry point (:func:`train_generator`, :func:`train_e2e`,
  :func:`compare_e2e_options`): the only place that builds a missing dense index, initialises or
  moves model directories and starts the index-shard actors.
"""

from re2g.train.rag_driver import (compare_e2e_options, ensure_dense_index, start_generator, start_index_actors,
                                   start_reranker, train_e2e, train_generator)
from re2g.train.rag_eval import evaluate_e2e, evaluate_rag, kilt_scores, options_markdown, page_rprec, results_table
from re2g.train.rag_model import Re2GModel, load_generator_dir, reinit_weights, untie_and_freeze_ctx
from re2g.train.rag_stages import E2EStage, GenerationStage, plan_examples, training_examples
from re2g.train.rag_steps import (QUERY_ENCODER_OPTIONS, IndexHandle, Reranked, StepParts, bm25_entries, bm25_hits,
                                  dpr_retrieve, e2e_step, fused_candidates, passage_scores, rag_step, retrieve_rerank,
                                  with_passages)

__all__ = ["QUERY_ENCODER_OPTIONS", "E2EStage", "GenerationStage", "IndexHandle", "Re2GModel", "Reranked", "StepParts",
           "bm25_entries", "bm25_hits", "compare_e2e_options", "dpr_retrieve", "e2e_step", "ensure_dense_index",
           "evaluate_e2e", "evaluate_rag", "fused_candidates", "kilt_scores", "load_generator_dir",
           "options_markdown", "page_rprec", "passage_scores", "plan_examples", "rag_step", "reinit_weights",
           "results_table", "retrieve_rerank", "start_generator", "start_index_actors", "start_reranker",
           "train_e2e", "train_generator", "training_examples", "untie_and_freeze_ctx", "with_passages"]
