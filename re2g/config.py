"""Typed configuration for every re2g stage and artifact.

A config is YAML in, validated by pydantic, and saved beside every artifact it made
(``config.yaml``). Three presets ship with the package:

* ``tiny``  -- models of a few hundred thousand parameters built from config, tokenizers trained
  on the corpus; for tests and the demo on CPU.
* ``small`` -- real pretrained weights that install offline: sentence-transformers' all-MiniLM-L6-v2
  (``asset:minilm``) as both DPR towers and as the reranker's start, on real Wikipedia text (the
  vital-articles task); the generator stays tiny.
* ``paper`` -- the checkpoints of the Re2G paper, loaded by hub name (needs a network) or from
  local ``save_pretrained`` directories.

``load_config(path, preset=..., overrides=[...])`` merges preset, file and ``a.b=value`` overrides
in that order; a bad value raises :class:`re2g.errors.ConfigError` naming the file, the field,
the value and what was expected.

Why one module of ~700 lines: it is the config's schema, one pydantic class per section with the
help text of every field; the sections refer to each other (presets, cross-field checks) and users
read it as the reference of every setting, so it stays in one place.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from re2g.errors import ConfigError


ASSET_PREFIX = "asset:"


def _absolute_if_local(v: str | None) -> str | None:
    """An existing local path is made absolute (Ray Train workers and Ray Data actors do not run in
    the driver's working directory); URIs, hub names (``org/model``) and paths not there yet are kept.
    ``asset:NAME`` is an asset of the local cache (``re2g assets``: ``asset:minilm``), resolved to its
    path; one not fetched yet is an error that says how to fetch it."""
    if v is not None and v.startswith(ASSET_PREFIX):
        from re2g.assets import AssetError, asset_path

        try:
            return str(asset_path(v[len(ASSET_PREFIX):]))
        except AssetError as e:
            raise ValueError(str(e)) from None
    if v is None or "://" in v:
        return v
    p = Path(v).expanduser()
    return str(p.resolve()) if p.exists() else v


# a model, index or data location: a path (made absolute when it exists here), a URI or a hub name
Location = Annotated[str | None, AfterValidator(_absolute_if_local)]

CONFIG_FILENAME = "config.yaml"
PRESETS = ("tiny", "small", "paper")


class _Strict(BaseModel):
    """Unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data


class SampleConfig(_Strict):
    """The sample knowledge task: synthetic (``re2g.data.sample``) or real text (``re2g.data.vital``)."""

    source: Literal["synthetic", "vital-articles"] = Field(
        "synthetic", description="synthetic: invented people, tasks slot_filling | qa | fact_verification; "
        "vital-articles: 10,033 English Wikipedia vital-article leads (`re2g assets fetch vital-articles`), "
        "task vital_qa (Wikidata description -> title)")
    size: Literal["tiny", "demo", "bench"] = Field(
        "demo", description="tiny: a few hundred passages (unit tests); demo: a few thousand (vital-articles: "
        "all 10,033 articles); bench: at least 1M passages (synthetic only; index benchmarks, no tasks beyond "
        "a small dev set)")
    seed: int = Field(13, description="random seed; the same seed gives byte-identical files")
    n_entities: int | None = Field(
        None, ge=10, description="number of entities (pages; vital-articles: articles); default from `size`")
    train_fraction: float = Field(0.7, gt=0, lt=1, description="share of entities whose queries go to train")
    dev_fraction: float = Field(0.15, gt=0, lt=1, description="share of entities whose queries go to dev")

    @model_validator(mode="after")
    def _vital_sizes(self) -> "SampleConfig":
        if self.source == "vital-articles" and self.size == "bench" and self.n_entities is None:
            raise ValueError("size 'bench' is the synthetic task's (1M passages); the vital-articles source has "
                             "10,033 articles: use size tiny (500) or demo (all), or n_entities")
        return self


class PassageConfig(_Strict):
    """Splitting a KILT knowledge source into passages (ids ``wikiid::[start,end]``)."""

    min_words: int = Field(50, ge=1, description="a passage is grown paragraph by paragraph to at least this many words")
    max_words: int = Field(100, ge=1, description="passages never exceed this many words; long paragraphs are cut")
    include_title_paragraph: bool = Field(
        False, description="KILT pages repeat the title as paragraph 0; keep it as passage text")

    @model_validator(mode="after")
    def _bounds(self) -> "PassageConfig":
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        return self


class DataConfig(_Strict):
    """Where the knowledge source and tasks come from."""

    sample: SampleConfig = Field(default_factory=SampleConfig)
    knowledge_source: Location = Field(
        None, description="KILT knowledge source jsonl (path or URI); None: use the sample task")
    train_file: Location = Field(None, description="KILT task jsonl for training")
    dev_file: Location = Field(None, description="KILT task jsonl for dev evaluation")
    test_file: Location = Field(None, description="KILT task jsonl for test evaluation")
    skip_bad_rows: bool = Field(False, description="skip malformed rows (counted and reported) instead of stopping")


# --------------------------------------------------------------------------- models


class TinyModelConfig(_Strict):
    """Sizes for models built from config (the ``tiny`` preset)."""

    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=8)
    vocab_size: int = Field(4000, ge=100, description="vocabulary of the locally trained tokenizers")
    max_position_embeddings: int = Field(512, ge=64)
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout of the tiny models (BERT hidden and "
                           "attention dropout; BART dropout, attention and activation dropout). 0 by default: with BERT's 0.1, 64-d models trained from scratch "
                           "on the sample task sat on a loss plateau (DPR on 2 workers: dev R@5 0.00-0.15 vs 0.9+ "
                           "without dropout)")
    reranker_exact_match: bool = Field(True, description="tiny reranker: token type 2 on passage tokens that occur "
                                       "in the query (an exact-match feature; from scratch the tiny cross-encoder "
                                       "did not learn lexical matching on the sample task without it)")
    generator_copy: bool = Field(True, description="tiny generator: a pointer-generator BART that can copy tokens of "
                                 "its source (re2g.models.pointer); the plain 64-d BART memorized training answers "
                                 "instead of reading them (gold passage given: dev EM 0.16 vs 0.62 after 400-600 steps)")
    generator_arch: Literal["bart", "llama"] = Field(
        "bart", description="tiny generator: bart (seq2seq, see generator_copy) or llama (a decoder-only causal LM "
        "from LlamaConfig, read through re2g.models.causal.CausalGenerator)")

    @model_validator(mode="after")
    def _heads(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ModelsConfig(_Strict):
    """The four models of Re2G. Each is a hub name or a local ``save_pretrained`` directory;
    ``None`` means: build a tiny model from ``tiny`` with the locally trained tokenizers."""

    query_encoder: Location = Field(None, description="query encoder: a DPR question encoder, any Hugging Face "
                                    "encoder (BERT, MiniLM, BGE, E5, ...) or a saved re2g bi-encoder (name or path)")
    ctx_encoder: Location = Field(None, description="context encoder (name or path); unset with an encoder "
                                  "checkpoint in query_encoder: that one encoder serves both sides")
    reranker: Location = Field(None, description="cross-encoder: any *ForSequenceClassification checkpoint, or a "
                               "plain encoder that gets a new one-logit head (name or path)")
    generator: Location = Field(None, description="generator (name or path): a seq2seq LM (BART, T5) or a "
                                "decoder-only causal LM (Llama, Qwen, Gemma, GPT-2...)")
    generator_kind: Literal["auto", "seq2seq", "causal"] = Field(
        "auto", description="which generator class reads models.generator: auto (the saved re2g_model.json kind, "
        "else the checkpoint's config.is_encoder_decoder), seq2seq or causal")
    generator_prompt_template: str | None = Field(
        None, description="causal generator: the prompt for one (query, passage) over {title}, {text}, {query} "
        "(None: the checkpoint's saved one, else re2g.models.causal.DEFAULT_PROMPT_TEMPLATE)")
    generator_chat_template: bool | None = Field(
        None, description="causal generator: wrap the prompt as a user turn of the tokenizer's chat template "
        "(None: the checkpoint's saved setting, else false; true needs a tokenizer with a chat template)")
    shared_encoder: bool = Field(False, description="one encoder for queries and passages instead of two")
    pooling: Literal["cls", "mean", "pooler"] | None = Field(
        None, description="how the bi-encoder's token states become a vector; unset: the checkpoint's "
        "(DPR: pooler; sentence-transformers: its Pooling module; other encoders: cls)")
    normalize: bool | None = Field(None, description="L2-normalize bi-encoder vectors; unset: the checkpoint's "
                                   "(sentence-transformers' Normalize module)")
    query_prefix: str | None = Field(None, description="text put before every query (E5: 'query: '); unset: "
                                     "the checkpoint's sentence-transformers prompt, else none")
    passage_prefix: str | None = Field(None, description="text put before every passage (E5: 'passage: ')")
    title_separator: str | None = Field(
        None, description="'pair': title and text as a tokenizer pair (DPR); any other string joins them into "
        "one text; unset: the checkpoint's (DPR: pair; sentence-transformers: ' ')")
    score_scale: float | None = Field(
        None, gt=0, description="factor on the bi-encoder's q.p before a softmax in training; unset: 20 for "
        "normalized vectors (sentence-transformers' scale), 1 for raw inner products (DPR)")
    query_max_length: int = Field(64, ge=8, le=4096)
    passage_max_length: int = Field(128, ge=8, le=4096)
    reranker_max_length: int = Field(128, ge=8, le=4096, description="query+passage pair length (256 allowed)")
    generator_source_max_length: int = Field(256, ge=8, le=4096, description="passage [SEP] query length")
    generator_target_max_length: int = Field(32, ge=1, le=4096)
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)

    def encoder_overrides(self) -> dict[str, Any]:
        """The bi-encoder settings this config sets (``BiEncoder.from_pretrained``'s keyword overrides)."""
        keys = ("pooling", "normalize", "query_prefix", "passage_prefix", "title_separator", "score_scale")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


# --------------------------------------------------------------------------- index / retrieval


class IndexConfig(_Strict):
    """Dense HNSW index over passage embeddings, in shards."""

    num_shards: int = Field(2, ge=1, description="HNSW shards, each built by its own Ray task")
    hnsw_m: int = Field(128, ge=2, description="HNSW graph degree M (smaller is fine for small corpora)")
    ef_construction: int = Field(200, ge=1)
    ef_search: int = Field(128, ge=1)
    metric: Literal["mips_l2", "ip"] = Field(
        "mips_l2", description="mips_l2: DPR's MIPS->L2 transform (one extra dimension); ip: inner-product HNSW")
    quantization: Literal["none", "sq8", "pq", "opq"] = Field(
        "none", description="sq8: 8-bit scalar quantization (large corpora); pq: product quantization (faiss "
        "IVF-PQ, or HNSW over PQ codes with pq_coarse hnsw); opq: the same after an OPQ rotation")
    exact: bool = Field(False, description="flat (exact) shards instead of HNSW; for tests and small corpora")
    pq_m: int | None = Field(
        None, ge=1, description="pq/opq: sub-quantizers (code bytes per vector at 8 bits); must divide the index "
        "dimension (D, or D+1 under metric mips_l2); unset: its largest divisor <= dimension/8")
    pq_nbits: int = Field(8, ge=4, le=12, description="pq/opq: bits per sub-quantizer code (8: faiss's fast path)")
    pq_coarse: Literal["ivf", "hnsw"] = Field(
        "ivf", description="pq/opq: ivf (inverted lists, nlist/nprobe) or hnsw (faiss IndexHNSWPQ: the HNSW graph "
        "(hnsw_m, ef_*) over PQ codes; L2 only, so metric mips_l2)")
    ivf_nlist: int | None = Field(
        None, ge=1, description="pq/opq with ivf: inverted lists per shard; unset: 4*sqrt(shard size), at most "
        "training rows/39 (faiss's k-means wants 39 points per centroid)")
    ivf_nprobe: int = Field(16, ge=1, description="pq/opq with ivf: lists searched per query (recorded; "
                            "the retriever's config value is used at load)")
    pq_train_size: int = Field(
        262144, ge=1, description="pq/opq: shard vectors sampled (seeded) to train the coarse quantizer, OPQ and "
        "the PQ codebooks (all of them when the shard is smaller)")
    shard_actors: bool = Field(False, description="hold each shard in its own Ray actor (scatter-gather search)")
    embed_batch_size: int = Field(64, ge=1)
    embed_actors: int = Field(1, ge=1, description="encoder actors in the Ray Data embedding pool")

    @model_validator(mode="after")
    def _pq_fields(self) -> "IndexConfig":
        if self.quantization not in ("pq", "opq"):
            return self
        if self.exact:
            raise ValueError(f"exact: true means float32 flat shards, but quantization {self.quantization!r} "
                             "is approximate: set exact false (pq_coarse picks ivf or hnsw)")
        if self.pq_coarse == "hnsw" and self.metric == "ip":
            raise ValueError("pq_coarse 'hnsw' (faiss IndexHNSWPQ) searches L2 only: use metric mips_l2 "
                             "(inner products through the MIPS->L2 transform) or pq_coarse 'ivf'")
        if self.pq_train_size < 2 ** self.pq_nbits:
            raise ValueError(f"pq_train_size ({self.pq_train_size}) is below 2**pq_nbits = {2 ** self.pq_nbits}: "
                             "each PQ codebook needs at least that many training vectors")
        if self.pq_coarse == "ivf" and self.ivf_nlist is not None and self.ivf_nlist > self.pq_train_size:
            raise ValueError(f"ivf_nlist ({self.ivf_nlist}) exceeds pq_train_size ({self.pq_train_size}): "
                             "k-means needs at least one training vector per list (39 for good lists)")
        return self


class BM25Config(_Strict):
    """Lucene BM25 through pyserini."""

    k1: float = Field(0.9, gt=0)
    b: float = Field(0.4, ge=0, le=1)
    threads: int = Field(2, ge=1)


class RetrievalConfig(_Strict):
    """How DPR and BM25 results are combined, and how many go on to the reranker and generator."""

    dpr_top_k: int = Field(12, ge=0, le=1000)
    bm25_top_k: int = Field(12, ge=0, le=1000)
    fusion: Literal["concat", "rrf", "linear"] = Field(
        "concat", description="concat: Re2G's DPR then BM25, deduplicated; rrf: reciprocal rank fusion; "
        "linear: weighted sum of min-max normalized scores")
    rrf_k: int = Field(60, ge=1)
    linear_dpr_weight: float = Field(0.5, ge=0, le=1)
    rerank_top_k: int = Field(5, ge=1, le=100, description="passages the reranker keeps for the generator")


class RayConfig(_Strict):
    """How to reach Ray. ``address=None`` starts a local Ray in-process."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    verbose: bool = Field(
        False, description="print Ray's own output (workers, Train, Data, Serve) on the terminal; "
        "false: it goes to RUN_DIR/logs/ray.log and the terminal shows re2g's progress (--verbose)")


# --------------------------------------------------------------------------- generation


class GenerationConfig(_Strict):
    """How answers are generated from the reranked passages (``re2g.models.decoding``)."""

    marginalization: Literal["sequence", "token"] = Field(
        "sequence", description="sequence: RAG-Sequence (beam search per passage, candidates rescored); "
        "token: RAG-Token (one decoder over the passage-weighted next-token distribution)")
    decoding: Literal["thorough", "fast"] = Field(
        "thorough", description="RAG-Sequence rescoring: thorough scores every candidate against every "
        "passage; fast gives p=0 to a candidate under the passages whose beams did not produce it")
    num_beams: int = Field(4, ge=1, description="RAG-Sequence: beam size of the search on each passage")
    num_return_sequences: int | None = Field(
        None, ge=1, description="RAG-Sequence: candidates kept per passage (None: num_beams)")
    token_num_beams: int = Field(1, ge=1, description="RAG-Token: beam size (1: greedy)")
    max_new_tokens: int | None = Field(
        None, ge=1, description="longest answer in tokens (None: models.generator_target_max_length)")
    title_sep: str | None = Field(None, description="between title and text in s_j (None: the generator's own)")
    query_sep: str | None = Field(None, description="between passage and query in s_j (None: the generator's own)")

    @model_validator(mode="after")
    def _returns(self) -> "GenerationConfig":
        if self.num_return_sequences is not None and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= "
                             f"num_beams ({self.num_beams})")
        return self


# --------------------------------------------------------------------------- serving


class ServeDeploymentConfig(_Strict):
    """One Ray Serve deployment: resources per replica, replicas (autoscaling), concurrency and
    dynamic batching (``@serve.batch``)."""

    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per replica; fractions allowed (Serve's "
                            "default is 1, too much on a laptop)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU); 0: CPU only")
    min_replicas: int = Field(1, ge=0, description="autoscaling lower bound (0: scale to zero when idle)")
    max_replicas: int = Field(1, ge=1, description="autoscaling upper bound")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at start (None: min_replicas)")
    target_ongoing_requests: float = Field(2.0, gt=0, description="autoscaling target: in-flight requests per replica")
    max_ongoing_requests: int = Field(16, ge=1, description="requests one replica works on at once "
                                      "(keep >= max_batch_size so batches can fill)")
    max_queued_requests: int = Field(64, ge=-1, description="requests queued per caller once every replica is "
                                     "busy; beyond it: 503 with Retry-After (-1: unbounded)")
    max_batch_size: int = Field(8, ge=1, description="dynamic batching: most requests in one batch")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="dynamic batching: longest wait for a batch to fill")

    @model_validator(mode="after")
    def _replicas(self) -> "ServeDeploymentConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must be within "
                             f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]")
        return self


class IngressServeConfig(ServeDeploymentConfig):
    """The HTTP ingress: cheap per request (it awaits the others), so many requests at once; two
    replicas, so a request the proxy sends again after losing one finds the other."""

    num_cpus: float = Field(0.1, ge=0)
    min_replicas: int = Field(2, ge=0, description="autoscaling lower bound (2: a replica's death loses no request)")
    max_replicas: int = Field(2, ge=1, description="autoscaling upper bound")
    max_ongoing_requests: int = Field(64, ge=1)
    target_ongoing_requests: float = Field(32.0, gt=0)


class GeneratorServeConfig(ServeDeploymentConfig):
    """The generator: the heaviest stage (beam search per passage)."""

    num_cpus: float = Field(0.5, ge=0)


class ServeConfig(_Strict):
    """The Ray Serve application (``serve/``): HTTP, limits, security and the four deployments."""

    host: str = Field("127.0.0.1", description="HTTP host (0.0.0.0: every interface)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    app_name: str = Field("re2g", description="Serve application name")
    route_prefix: str = Field("/", description="URL prefix of the application")
    batching: bool = Field(True, description="dynamic batching in the query encoder, reranker and generator; "
                           "False: every request runs alone")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of a request; past it the answer is 504")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After (seconds) of a 503 when the queues are full")
    api_key: str | None = Field(None, description="require this key in the API-key header (a literal is saved "
                                "with the config: prefer api_key_env)")
    api_key_env: str | None = Field("RE2G_API_KEY", description="environment variable holding the API key "
                                    "(read where the app is built; unset or empty: no authentication)")
    api_key_header: str = Field("X-API-Key", description="request header carrying the key "
                                "(`Authorization: Bearer KEY` is accepted too)")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS (['*']: any; "
                                    "[]: no CORS headers)")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="largest request body; beyond it: 413 "
                                "(the API's item limits are fitted to it, so a request valid by /openapi.json fits)")
    max_query_tokens: int | None = Field(None, ge=1, description="longest query in query-encoder tokens "
                                         "(None: models.query_max_length); beyond it: 422")
    max_batch_queries: int = Field(32, ge=1, le=1024, description="most queries in one /v1/answer:batch request")
    shard_actors: bool | None = Field(None, description="dense shards in named Ray actors shared by the retriever "
                                      "replicas (None: index.shard_actors)")
    shard_actor_cpus: float = Field(0.25, ge=0, description="CPUs reserved per shard actor")
    shard_actor_resources: dict[str, float] = Field(
        default_factory=dict, description="other Ray resources per shard actor, e.g. {memory: 3.0e10} (bytes) or "
        "a custom node resource that marks the index nodes")
    shard_actor_max_restarts: int = Field(3, ge=-1, description="restarts of a shard actor that died (-1: always); "
                                          "searches sent meanwhile are retried")
    health_check_period_s: float = Field(2.0, gt=0, description="Serve calls check_health this often; a replica "
                                         "that died is noticed (and replaced) within it, and the requests "
                                         "meant for it wait that long (Serve's default: 10)")
    health_probe_period_s: float = Field(10.0, gt=0, description="in check_health, a replica idle this long runs "
                                         "a probe (a tiny input through its model)")
    health_check_timeout_s: float = Field(30.0, gt=0, description="a health check slower than this fails")
    ingress: IngressServeConfig = Field(default_factory=IngressServeConfig)
    retriever: ServeDeploymentConfig = Field(default_factory=ServeDeploymentConfig)
    reranker: ServeDeploymentConfig = Field(default_factory=ServeDeploymentConfig)
    generator: GeneratorServeConfig = Field(default_factory=GeneratorServeConfig)


# --------------------------------------------------------------------------- training


class DeepSpeedConfig(_Strict):
    """How the training loop configures DeepSpeed (built into a DeepSpeed JSON config per run)."""

    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage 0-3 (optimizer/gradient/parameter partitioning)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU (fp16 is GPU-only and not offered)")
    gradient_clipping: float = Field(1.0, ge=0, description="max global gradient norm (0: no clipping)")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload the optimizer state to CPU (stage >= 1)")


class LoraTrainConfig(_Strict):
    """LoRA adapters on the generator (stages 2 and 4, through ``peft``): only the adapter weights train,
    the base weights stay as they were. For causal-LM readers (``re2g.models.lora``)."""

    enabled: bool = Field(False, description="train LoRA adapters instead of every generator weight")
    r: int = Field(8, ge=1, description="rank of the adapters")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) * B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | None = Field(
        None, description="module names (or name suffixes) that get adapters, e.g. [q_proj, k_proj, v_proj, o_proj]; "
        "None: peft's default for the architecture (Llama, Gemma, Qwen: q_proj, v_proj)")
    merge_on_save: bool = Field(True, description="checkpoints hold the adapters merged into a plain Hugging Face "
                                "model (True) or the adapter alone (adapter_config.json + weights, with the base "
                                "model's location in re2g_model.json: lora_base)")


class StageTrainConfig(_Strict):
    """What every training stage shares: optimization, schedule, batching, checkpoints."""

    epochs: int = Field(2, ge=1, description="passes over the training examples")
    batch_size: int = Field(16, ge=1, description="queries per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-5, gt=0, description="peak learning rate (after warmup)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="share of the steps with linear warmup; "
                                   "then linear decay to 0")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (None: all epochs)")
    seed: int = Field(0, description="seed for model init, sampling and batch order")
    log_every: int = Field(10, ge=1, description="log loss/lr/examples-per-s every N optimizer steps")
    checkpoint_every: int | None = Field(None, ge=1, description="checkpoint every N steps (None: once per epoch); "
                                         "the final step is always checkpointed")
    eval_every: int | None = Field(None, ge=1, description="dev evaluation every N steps (None: at the end only)")
    max_dev_queries: int | None = Field(None, ge=1, description="evaluate on the first N dev queries (None: all)")


class DPRTrainConfig(StageTrainConfig):
    """Stage 1: the DPR bi-encoder with BM25 hard negatives and cross-worker in-batch negatives."""

    lr: float = Field(2e-5, gt=0)
    hard_negatives: int = Field(1, ge=0, description="hard negatives per query, sampled from the mined top-k")
    sample_from_top: int = Field(30, ge=1, description="sample hard negatives from the first N mined ones")
    remote_grad: bool = Field(True, description="in-batch negatives gathered across workers: True = differentiable "
                              "all-gather (the gradient of one global batch); False = other workers' passages are "
                              "constants (DPR's code; measured here: tiny models from scratch did not learn)")
    eval_pool_size: int | None = Field(
        100_000, ge=1, description="dense dev evaluation over a pool of at most this many passages: the dev "
        "positives, their BM25 top-20 and a seeded random sample of the corpus, searched with faiss (an optimistic "
        "estimate of full-corpus recall, see re2g/train/evaluate.py; the pool is the whole corpus when it has "
        "no more passages, e.g. the tiny and demo samples); None: every passage, exactly")


class RerankerTrainConfig(StageTrainConfig):
    """Stage 3: the cross-encoder on the merged DPR + BM25 candidates of each training query."""

    lr: float = Field(3e-5, gt=0)
    batch_size: int = Field(4, ge=1, description="queries per worker per micro-batch (each with its list)")
    max_pairs_per_query: int = Field(24, ge=2, description="candidate list length cap (positives + negatives)")
    max_positives: int = Field(2, ge=1, description="positives kept per list")
    dense_index: Location = Field(
        None, description="dense index for the DPR part of the candidates (with models.query_encoder); "
        "None: BM25 candidates only")
    candidates_top_k: int | None = Field(None, ge=1, description="hybrid top-k per query (None: dpr_top_k + bm25_top_k)")
    init_from_biencoder: Location = Field(
        None, description="start the reranker's BERT from this saved bi-encoder's query encoder (tiny models, "
        "which have no pretrained language model; None: models.reranker as configured)")


class JointTrainConfig(StageTrainConfig):
    """RocketQAv2-style joint training of the retriever and the reranker on candidate lists."""

    lr: float = Field(2e-5, gt=0, description="learning rate of the bi-encoder")
    reranker_lr: float | None = Field(None, gt=0, description="learning rate of the reranker (None: lr)")
    batch_size: int = Field(4, ge=1)
    list_size: int = Field(8, ge=2, description="candidates per query: positives + hard negatives")
    max_positives: int = Field(1, ge=1, description="positives per list")
    kl_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    eval_pool_size: int | None = Field(
        100_000, ge=1, description="dense dev evaluation over a pool of at most this many passages: the dev "
        "positives, their hybrid (DPR + BM25) candidates and a seeded random sample of the corpus, searched "
        "with faiss (an optimistic estimate of full-corpus recall, see re2g/train/evaluate.py; the pool is the "
        "whole corpus when it has no more passages, e.g. the tiny and demo samples); None: every passage, exactly")


class GeneratorTrainConfig(StageTrainConfig):
    """Stage 2 (RAG): query encoder + BART on the target outputs; passages = DPR top-n from the fixed
    index (held by index-shard Ray actors), weighted by softmax(q . p) and marginalized."""

    lr: float = Field(3e-5, gt=0, description="learning rate of the generator")
    query_encoder_lr: float | None = Field(None, gt=0, description="learning rate of the query encoder (None: lr)")
    batch_size: int = Field(8, ge=1, description="queries per worker per micro-batch (each with n_docs passages)")
    n_docs: int = Field(5, ge=1, description="passages retrieved per query (DPR top-n) and marginalized over")
    marginalization: Literal["sequence", "token"] | None = Field(
        None, description="RAG-Sequence or RAG-Token loss (None: generation.marginalization)")
    train_query_encoder: bool = Field(True, description="train the query encoder with the generator (RAG); "
                                      "False: only the generator learns")
    biencoder: Location = Field(None, description="bi-encoder whose context encoder built the index (None: the "
                                  "first of RUN_DIR/models/{dpr,dpr_init,biencoder} matching the index)")
    generator: Location = Field(None, description="generator to start from (None: models.generator, else "
                                  "RUN_DIR/models/init/generator, made from config when missing)")
    dense_index: Location = Field(None, description="dense index directory (None: RUN_DIR/index/dense; built "
                                    "with the bi-encoder when missing)")
    index_actor_cpus: float = Field(0.0, ge=0, description="CPUs reserved per index-shard actor (0: they share "
                                    "the workers' CPUs; reserve some on a cluster)")
    reinit_std: float | None = Field(
        None, gt=0, description="re-draw the starting generator's Linear/Embedding weights from N(0, std) before "
        "training (a tiny BART from scratch: BART's own 0.02 stayed at the answers' unconditional distribution "
        "for 1,500 steps on the sample task, 0.1 learned to copy answers within ~1,000); None: keep its weights")
    max_dev_queries: int | None = Field(100, ge=1, description="evaluate on the first N dev queries (None: all)")
    lora: LoraTrainConfig = Field(default_factory=LoraTrainConfig, description="LoRA adapters on the generator")


class E2ETrainConfig(StageTrainConfig):
    """Stage 4 (end to end): DPR + BM25 candidates -> reranker top-k -> BART, weighted by the reranker's
    scores, so the generator's loss trains the reranker; the query encoder per ``query_encoder``."""

    query_encoder: Literal["combined", "frozen", "distill"] = Field(
        "distill", description="combined: doc score = log_softmax(DPR) + log_softmax(reranker); frozen: query "
        "encoder not updated; distill: + distill_weight * KL(reranker || DPR) at distill_temperature, "
        "over all candidates (BM25 hits included)")
    lr: float = Field(3e-5, gt=0, description="learning rate of the generator")
    reranker_lr: float | None = Field(None, gt=0, description="learning rate of the reranker (None: lr)")
    query_encoder_lr: float | None = Field(None, gt=0, description="learning rate of the query encoder (None: lr)")
    batch_size: int = Field(4, ge=1, description="queries per worker per micro-batch")
    distill_temperature: float = Field(10.0, gt=0, description="KD temperature T (the loss is KL * T^2)")
    distill_weight: float = Field(1.0, ge=0, description="weight of the KD loss (distill)")
    marginalization: Literal["sequence", "token"] | None = Field(
        None, description="RAG-Sequence or RAG-Token loss (None: generation.marginalization)")
    biencoder: Location = Field(None, description="bi-encoder to start from (None: stage 2's, "
                                  "RUN_DIR/models/generator/biencoder, else one matching the index)")
    reranker: Location = Field(None, description="reranker to start from (None: RUN_DIR/models/reranker, "
                                 "else models.reranker, else one made from config)")
    generator: Location = Field(None, description="generator to start from (None: RUN_DIR/models/generator)")
    dense_index: Location = Field(None, description="dense index directory (None: RUN_DIR/index/dense)")
    index_actor_cpus: float = Field(0.0, ge=0, description="CPUs reserved per index-shard actor")
    max_dev_queries: int | None = Field(100, ge=1, description="evaluate on the first N dev queries (None: all)")
    lora: LoraTrainConfig = Field(default_factory=LoraTrainConfig, description="LoRA adapters on the generator")


class MiningConfig(_Strict):
    """Hard-negative mining for DPR and the joint lists (``re2g mine-negatives``). The pool fields
    (``actors`` ... ``actor_resources``) also size the Ray Data job that computes the reranker's
    candidates (``re2g candidates``)."""

    top_k: int = Field(50, ge=1, description="retrieve this many per training query, then filter")
    keep: int = Field(30, ge=1, description="hard negatives kept per query after filtering")
    drop_answer_passages: bool | None = Field(
        None, description="drop passages that contain an answer; None: yes, except for fact verification "
        "(answers SUPPORTS/REFUTES)")
    positive_threshold: float = Field(0.75, gt=0, le=1, description="provenance overlap for a positive passage")
    actors: int | None = Field(None, ge=1, description="retrieval actors in the Ray Data pool that mines negatives "
                               "and computes candidates (None: min(2, cluster CPUs - 1), at least 1)")
    actor_cpus: float | None = Field(None, gt=0, description="CPUs each retrieval actor reserves; fractions allowed "
                                     "(None: bm25.threads, capped so that the pool leaves Ray Data one CPU)")
    actor_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per retrieval "
                                              "actor, e.g. {index_node: 1}: the nodes that hold the BM25 index")
    batch_size: int = Field(256, ge=1, description="queries per retrieval batch (one Ray Data block each)")


class TrainConfig(_Strict):
    """Training on Ray Train + DeepSpeed: workers, inputs and one section per stage."""

    task: Literal["slot_filling", "qa", "fact_verification", "vital_qa"] = Field(
        "slot_filling", description="the sample task to train on when data.train_file is not set (vital_qa: "
        "the task of data.sample.source=vital-articles, chosen by itself when train.task is not set)")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks)")
    use_gpu: bool | None = Field(None, description="one GPU per worker; None: when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (fractions allowed)")
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the latest checkpoint")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept per stage")
    negatives: Location = Field(None, description="mined negatives jsonl (None: RUN_DIR/train/negatives.jsonl)")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    dpr: DPRTrainConfig = Field(default_factory=DPRTrainConfig)
    reranker: RerankerTrainConfig = Field(default_factory=RerankerTrainConfig)
    joint: JointTrainConfig = Field(default_factory=JointTrainConfig)
    generator: GeneratorTrainConfig = Field(default_factory=GeneratorTrainConfig)
    e2e: E2ETrainConfig = Field(default_factory=E2ETrainConfig)


class QuickstartConfig(_Strict):
    """What ``re2g quickstart`` runs (its steps: ``re2g.quickstart.STEPS``)."""

    skip: list[str] = Field(default_factory=list, description="quickstart steps to leave out, by name "
                            "(e.g. generator, e2e, evaluate: the retrieval side alone)")


class Re2GConfig(_Strict):
    """Everything a run needs. Saved as ``config.yaml`` in every artifact directory."""

    preset: Literal["tiny", "small", "paper", "custom"] = "tiny"
    run_dir: str = Field("runs/quickstart", validate_default=True,
                         description="where the run's artifacts go (path or URI; a local path is made absolute)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: in a Ray actor (Serve replica, predict actor) CUDA only when Ray gave it a GPU; in a driver CUDA when one is visible (re2g.runtime.pick_device)")
    data: DataConfig = Field(default_factory=DataConfig)
    passages: PassageConfig = Field(default_factory=PassageConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    bm25: BM25Config = Field(default_factory=BM25Config)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    quickstart: QuickstartConfig = Field(default_factory=QuickstartConfig)

    @model_validator(mode="after")
    def _sample_task(self) -> "Re2GConfig":
        """train.task must be a task of the sample's source (vital_qa for vital-articles); when it was not
        set, a vital-articles source picks vital_qa."""
        vital = self.data.sample.source == "vital-articles"
        if vital and self.train.task != "vital_qa" and "task" not in self.train.model_fields_set:
            self.train.task = "vital_qa"
        if self.data.train_file is None and vital != (self.train.task == "vital_qa"):
            raise ValueError(f"train.task={self.train.task!r} is not a task of data.sample.source="
                             f"{self.data.sample.source!r} (synthetic: slot_filling, qa, fact_verification; "
                             "vital-articles: vital_qa)")
        return self

    @field_validator("run_dir")
    @classmethod
    def _absolute_run_dir(cls, v: str) -> str:
        """A local run directory is made absolute: Ray Train workers and Ray Data actors do not run
        in the driver's working directory, so a relative path would point elsewhere there."""
        return v if "://" in v else str(Path(v).expanduser().resolve())


# --------------------------------------------------------------------------- loading


def _describe(loc: tuple, msg: str, value: Any) -> str:
    field = ".".join(str(p) for p in loc) or "<root>"
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"field '{field}': got {shown}: {msg}"


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: field 'a.b': got VALUE: expected ...``."""
    lines = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `re2g config --help`)"
        lines.append(f"{source}: " + _describe(e["loc"], msg, e.get("input")))
    return "\n".join(lines)


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. index.num_shards=4")
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {override!r}: empty key")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{p}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def preset_dict(name: str) -> dict:
    """The YAML of a bundled preset as a dict."""
    if name not in PRESETS:
        raise ConfigError(f"preset: got {name!r}: expected one of {', '.join(PRESETS)} (or custom)")
    text = resources.files("re2g").joinpath("presets", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, *, preset: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Re2GConfig:
    """Preset (default: the file's ``preset:`` key, else ``tiny``), then the file, then overrides."""
    file_tree = _read_yaml(path) if path is not None else {}
    name = preset or file_tree.get("preset") or "tiny"
    tree = {} if name == "custom" else preset_dict(name)
    tree = _deep_merge(tree, file_tree)
    if preset:
        tree["preset"] = preset
    for o in overrides:
        _apply_override(tree, o)
    source = str(path) if path is not None else f"preset {name}"
    if overrides:
        source += " + overrides"
    try:
        return Re2GConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: BaseModel, directory: str | Path) -> Path:
    """Write ``config.yaml`` into ``directory`` (created if needed) and return its path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / CONFIG_FILENAME
    from re2g.artifacts import write_text_atomic

    write_text_atomic(out, config_to_yaml(cfg))
    return out


def load_saved_config(directory: str | Path, model: type[BaseModel] = Re2GConfig) -> BaseModel:
    """Load the ``config.yaml`` an artifact directory was saved with."""
    path = Path(directory) / CONFIG_FILENAME
    tree = _read_yaml(path)
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
