"""Hugging Face Hub emulator: the slice of the Hub API that ``huggingface_hub.HfApi`` and
``hf_hub_download`` use to preflight a deployment.

Reached with ``HfApi(endpoint=hub.url, token=...)`` (or ``HF_ENDPOINT``). Paths, status codes and
the ``X-Error-Code`` / ``X-Error-Message`` headers are the ones ``huggingface_hub.utils.hf_raise_for_status``
turns into ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``GatedRepoError`` /
``RemoteEntryNotFoundError``:

==========================================================  ===============================================
``GET /api/whoami-v2``                                      the token's user (401 for an invalid token)
``GET /api/models/{repo}[/revision/{rev}]``                 ``model_info`` (``?expand=`` filters fields)
``GET /api/models/{repo}/auth-check``                       ``auth_check``: 403 ``GatedRepo`` without access
``GET /api/models/{repo}/refs``                             ``list_repo_refs``
``GET /api/models/{repo}/commits/{rev}``                    ``list_repo_commits``
``GET /api/models/{repo}/tree/{rev}[/{path}]``              ``list_repo_tree`` / ``list_repo_files``
``HEAD|GET /{repo}/resolve/{rev}/{file}``                   ``hf_hub_download`` of the small files
                                                            (config.json, generation_config.json,
                                                            tokenizer_config.json, README.md, the index)
==========================================================  ===============================================

Semantics follow the real Hub: metadata of gated repos is public (``model_info`` answers 200), files and
``auth-check`` need gated access (401 ``GatedRepo`` anonymous, 403 ``GatedRepo`` for a token without
access); private repos are invisible to others (404 ``RepoNotFound``, 401 anonymous); an invalid token
is refused everywhere with 401 "Invalid credentials in Authorization header". Weight shards are listed
(sizes, LFS info: ``lfs.oid`` is the sha256 of the bytes); those up to ``DOWNLOADABLE_LFS_BYTES`` are served as
the Hub serves LFS files: ``/resolve`` answers 302 to the storage (``X-Linked-Etag`` = the sha256,
``X-Linked-Size``), which serves the bytes (``Range`` too). Bigger ones are not downloadable here.

Tokens: ``hf_sandbox_read`` (user ``sandbox-user``, member of ``sandbox-org``, access to every gated
repo) and ``hf_sandbox_nogate`` (user ``sandbox-nogate``, no gated access); anything else is invalid.

Python API for tests and the model runtime: ``add_model(...)``, ``push_revision(repo, branch="main")``,
``add_tag``, ``params(repo)``, ``config(repo)``, ``resolve(repo, rev)``, ``chat_template(repo)``,
``add_token(...)``, ``snapshot()``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from sandbox.core import Clock, Emulator, Faults, HttpError, JsonHandler, SandboxHTTPServer, route, serve
from sandbox.hub_webhooks import Webhooks

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
EXPAND_FIELDS = (
    "author", "baseModels", "cardData", "childrenModelCount", "config", "createdAt", "disabled", "downloads",
    "downloadsAllTime", "evalResults", "gated", "gguf", "inference", "inferenceProviderMapping", "lastModified",
    "library_name", "likes", "mask_token", "model-index", "pipeline_tag", "private", "resourceGroup",
    "safetensors", "sha", "siblings", "spaces", "tags", "transformersInfo", "trendingScore", "usedStorage",
    "widgetData",
)
SHARD_BYTES = 5 * 10**9  # the Hub's usual max shard size
# Weight files up to this size are served (bytes made from the repo and path, their sha256 the LFS oid); larger
# ones stay listed only: the sandbox holds what it serves and what Cloud Storage keeps in memory.
DOWNLOADABLE_LFS_BYTES = 256 * 2**20


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".000Z"


def _sha(*parts: Any) -> str:
    return hashlib.sha1(":".join(str(p) for p in parts).encode()).hexdigest()


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file: what the Hub sends as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubUser:
    name: str
    fullname: str
    gated_access: bool = True  # access granted to every gated repo
    granted: set[str] = field(default_factory=set)  # gated repos granted one by one
    orgs: tuple[str, ...] = ()
    role: str = "read"

    def can_read_gated(self, repo_id: str) -> bool:
        return self.gated_access or repo_id in self.granted


@dataclass
class Commit:
    sha: str
    title: str
    date: float
    files: dict[str, bytes]
    lfs: dict[str, int]  # weight shards: path -> size (served up to DOWNLOADABLE_LFS_BYTES, see lfs_bytes)
    author: str = "sandbox-bot"
    parent: str | None = None  # git history: a branch's commits are its head's ancestors, nothing else


@dataclass
class Repo:
    id: str
    params: dict[str, int]
    gated: bool | str = False
    private: bool = False
    pipeline_tag: str | None = "text-generation"
    library_name: str = "transformers"
    tags: list[str] = field(default_factory=list)
    license: str = "apache-2.0"
    base_model: str | None = None
    created: float = 0.0
    downloads: int = 0
    likes: int = 0
    commits: list[Commit] = field(default_factory=list)  # oldest first
    branches: dict[str, str] = field(default_factory=dict)
    tag_refs: dict[str, str] = field(default_factory=dict)
    shard_bytes: int = SHARD_BYTES

    @property
    def author(self) -> str:
        return self.id.split("/", 1)[0] if "/" in self.id else self.id

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    def commit(self, sha: str) -> Commit:
        return next(c for c in self.commits if c.sha == sha)


# ---- catalogue --------------------------------------------------------------------------------------

def _llama_cfg(**kw: Any) -> dict[str, Any]:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "max_position_embeddings": 4096, "vocab_size": 32000,
           "hidden_act": "silu", "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "bos_token_id": 1,
           "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float16",
           "transformers_version": "4.31.0.dev0"}
    cfg.update(kw)
    return cfg


def _gemma2_cfg(**kw: Any) -> dict[str, Any]:
    cfg = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 2304,
           "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
           "head_dim": 256, "max_position_embeddings": 8192, "vocab_size": 256000, "sliding_window": 4096,
           "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256,
           "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
           "bos_token_id": 2, "eos_token_id": [1, 107], "pad_token_id": 0, "torch_dtype": "bfloat16",
           "transformers_version": "4.42.4"}
    cfg.update(kw)
    return cfg


def _qwen2_cfg(**kw: Any) -> dict[str, Any]:
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
           "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "max_position_embeddings": 32768, "max_window_layers": 28, "vocab_size": 152064,
           "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "sliding_window": 131072, "use_sliding_window": False,
           "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "transformers_version": "4.43.1"}
    cfg.update(kw)
    return cfg


def _mistral_cfg(**kw: Any) -> dict[str, Any]:
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "max_position_embeddings": 32768, "sliding_window": 4096, "vocab_size": 32000, "rope_theta": 10000.0,
           "rms_norm_eps": 1e-05, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0"}
    cfg.update(kw)
    return cfg


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + "
    "' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
    "message['content'] + '[/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + "
    "eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

# repo id -> (params by dtype, gated, pipeline_tag, tags, config, chat template, license, base model)
CATALOGUE: dict[str, dict[str, Any]] = {
    "google/paligemma2-3b-pt-224": dict(
        params={"BF16": 3032242416}, gated="manual", pipeline_tag="image-text-to-text", license="gemma",
        tags=["transformers", "safetensors", "paligemma", "image-text-to-text", "arxiv:2412.03555",
              "license:gemma", "text-generation-inference", "endpoints_compatible", "region:us"],
        config={"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
                "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "hidden_size": 2304,
                "image_token_index": 257152, "projection_dim": 2304, "torch_dtype": "bfloat16",
                "transformers_version": "4.47.0.dev0",
                "text_config": _gemma2_cfg(architectures=None, vocab_size=257216, num_image_tokens=256),
                "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152,
                                  "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                                  "patch_size": 14, "image_size": 224, "num_image_tokens": 256,
                                  "projection_dim": 2304, "vision_use_head": False}},
        chat_template=None),
    "google/gemma-2-2b-it": dict(
        params={"BF16": 2614341888}, gated="manual", license="gemma", base_model="google/gemma-2-2b",
        tags=["transformers", "safetensors", "gemma2", "text-generation", "conversational", "arxiv:2408.00118",
              "license:gemma", "text-generation-inference", "endpoints_compatible", "region:us"],
        config=_gemma2_cfg(), chat_template=GEMMA_TEMPLATE),
    "google/gemma-2-9b-it": dict(
        params={"BF16": 9241705984}, gated="manual", license="gemma", base_model="google/gemma-2-9b",
        tags=["transformers", "safetensors", "gemma2", "text-generation", "conversational", "license:gemma",
              "text-generation-inference", "endpoints_compatible", "region:us"],
        config=_gemma2_cfg(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                           num_key_value_heads=8, query_pre_attn_scalar=256),
        chat_template=GEMMA_TEMPLATE),
    "google/gemma-7b-it": dict(
        params={"BF16": 8537680896}, gated="manual", license="gemma", base_model="google/gemma-7b",
        tags=["transformers", "safetensors", "gemma", "text-generation", "conversational", "license:gemma",
              "text-generation-inference", "endpoints_compatible", "region:us"],
        config={"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 3072,
                "intermediate_size": 24576, "num_hidden_layers": 28, "num_attention_heads": 16,
                "num_key_value_heads": 16, "head_dim": 256, "max_position_embeddings": 8192, "vocab_size": 256000,
                "hidden_act": "gelu", "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "bos_token_id": 2,
                "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16", "transformers_version": "4.38.0"},
        chat_template=GEMMA_TEMPLATE),
    "meta-llama/Llama-2-7b-chat-hf": dict(
        params={"F16": 6738415616}, gated="manual", license="llama2", base_model="meta-llama/Llama-2-7b-hf",
        tags=["transformers", "pytorch", "safetensors", "llama", "text-generation", "facebook", "meta", "llama-2",
              "conversational", "en", "arxiv:2307.09288", "license:llama2", "text-generation-inference",
              "endpoints_compatible", "region:us"],
        config=_llama_cfg(rms_norm_eps=1e-06), chat_template=LLAMA2_TEMPLATE),
    "meta-llama/Llama-2-7b-hf": dict(
        params={"F16": 6738415616}, gated="manual", license="llama2",
        tags=["transformers", "pytorch", "safetensors", "llama", "text-generation", "facebook", "meta", "llama-2",
              "en", "arxiv:2307.09288", "license:llama2", "text-generation-inference", "endpoints_compatible",
              "region:us"],
        config=_llama_cfg(), chat_template=None),
    "mistralai/Mistral-7B-v0.1": dict(
        params={"BF16": 7241732096}, gated=False,
        tags=["transformers", "pytorch", "safetensors", "mistral", "text-generation", "pretrained", "en",
              "arxiv:2310.06825", "license:apache-2.0", "text-generation-inference", "endpoints_compatible",
              "region:us"],
        config=_mistral_cfg(), chat_template=None),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(
        params={"BF16": 7248023552}, gated="auto", base_model="mistralai/Mistral-7B-v0.3",
        tags=["transformers", "safetensors", "mistral", "text-generation", "conversational", "license:apache-2.0",
              "text-generation-inference", "endpoints_compatible", "region:us"],
        config=_mistral_cfg(vocab_size=32768, rope_theta=1000000.0, sliding_window=None,
                            transformers_version="4.42.0.dev0"),
        chat_template=MISTRAL_TEMPLATE),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        params={"BF16": 7615616512}, gated=False, base_model="Qwen/Qwen2.5-7B",
        tags=["transformers", "safetensors", "qwen2", "text-generation", "chat", "conversational", "en",
              "arxiv:2309.00071", "arxiv:2407.10671", "license:apache-2.0", "text-generation-inference",
              "endpoints_compatible", "region:us"],
        config=_qwen2_cfg(), chat_template=CHATML_TEMPLATE),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(
        params={"BF16": 1543714304}, gated=False, base_model="Qwen/Qwen2.5-1.5B",
        tags=["transformers", "safetensors", "qwen2", "text-generation", "chat", "conversational", "en",
              "license:apache-2.0", "text-generation-inference", "endpoints_compatible", "region:us"],
        config=_qwen2_cfg(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                          max_window_layers=21, vocab_size=151936, tie_word_embeddings=True),
        chat_template=CHATML_TEMPLATE),
    "meta-llama/Llama-3.1-70B-Instruct": dict(
        params={"BF16": 70553706496}, gated="manual", license="llama3.1", base_model="meta-llama/Llama-3.1-70B",
        tags=["transformers", "safetensors", "llama", "text-generation", "facebook", "meta", "pytorch", "llama-3",
              "conversational", "en", "de", "fr", "license:llama3.1", "text-generation-inference",
              "endpoints_compatible", "region:us"],
        config=_llama_cfg(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, max_position_embeddings=131072, vocab_size=128256,
                          rope_theta=500000.0, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                          rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                          torch_dtype="bfloat16", transformers_version="4.42.3"),
        chat_template=LLAMA3_TEMPLATE),
    # AWQ 4-bit: safetensors counts the packed int32 tensors, so "params" reads ~1.13B for a 7B model.
    "TheBloke/Llama-2-7B-Chat-AWQ": dict(
        params={"I32": 865075200, "F16": 263458816}, gated=False, license="llama2",
        base_model="meta-llama/Llama-2-7b-chat-hf",
        tags=["transformers", "safetensors", "llama", "text-generation", "facebook", "meta", "llama-2", "en",
              "base_model:meta-llama/Llama-2-7b-chat-hf", "license:llama2", "4-bit", "awq", "region:us"],
        config=_llama_cfg(rms_norm_eps=1e-06, quantization_config={
            "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}),
        chat_template=LLAMA2_TEMPLATE),
    # A private fine-tune owned by the read token's organization (invisible to sandbox-nogate).
    "sandbox-org/gemma-2-2b-it-support": dict(
        params={"BF16": 2614341888}, gated=False, private=True, license="gemma",
        base_model="google/gemma-2-2b-it",
        tags=["transformers", "safetensors", "gemma2", "text-generation", "conversational", "license:gemma",
              "region:us"],
        config=_gemma2_cfg(), chat_template=GEMMA_TEMPLATE),
}

DEFAULT_USERS: dict[str, HubUser] = {
    "hf_sandbox_read": HubUser("sandbox-user", "Sandbox User", gated_access=True, orgs=("sandbox-org",)),
    "hf_sandbox_nogate": HubUser("sandbox-nogate", "Sandbox No-Gate", gated_access=False),
}

EPOCH = 1719792000.0  # 2024-07-01: catalogue history dates are relative to this


class Hub(Emulator):
    """The Hub API on 127.0.0.1 (service ``"hub"`` for faults)."""

    def __init__(self, *, faults: Faults, clock: Clock | None = None,
                 users: dict[str, HubUser] | None = None, catalogue: bool = True) -> None:
        self.faults = faults
        self.clock = clock
        self.users: dict[str, HubUser] = copy.deepcopy(users if users is not None else DEFAULT_USERS)
        self.repos: dict[str, Repo] = {}
        self._oids: dict[tuple[str, str, int], str] = {}  # (repo, path, size) -> sha256 of a weight file
        self._lock = threading.RLock()
        self._handler = HubHandler
        self._server: SandboxHTTPServer | None = None
        self._storage: SandboxHTTPServer | None = None
        self.webhooks = Webhooks()  # repo webhooks: a push POSTs the Hub's payload
        if catalogue:
            for i, (repo_id, meta) in enumerate(CATALOGUE.items()):
                self._add_catalogue(repo_id, i, meta)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        super().start()
        if self._storage is None:  # LFS files live on another host (a signed-URL CDN), as on the Hub
            self._storage = serve(LfsStorageHandler, state=self, faults=self.faults)

    def stop(self) -> None:
        if self._storage is not None:
            self._storage.stop()
            self._storage = None
        super().stop()

    # ---- catalogue management ----------------------------------------------------------------------
    def _files(self, repo: Repo, config: dict[str, Any], chat_template: str | None, rev_no: int
               ) -> tuple[dict[str, bytes], dict[str, int]]:
        weight_bytes = sum(n * DTYPE_BYTES.get(dt, 2) for dt, n in repo.params.items())
        shards = max(1, -(-weight_bytes // repo.shard_bytes))
        lfs = {}
        if shards == 1:
            lfs["model.safetensors"] = weight_bytes
        else:
            for i in range(shards):
                size = min(repo.shard_bytes, weight_bytes - i * repo.shard_bytes)
                lfs[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = size
        tok_cfg: dict[str, Any] = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                                   "model_max_length": _max_len(config) or 4096,
                                   "tokenizer_class": "PreTrainedTokenizerFast"}
        if chat_template:
            tok_cfg["chat_template"] = chat_template
        text_cfg = config.get("text_config") or config
        gen_cfg = {"_from_model_config": True, "bos_token_id": text_cfg.get("bos_token_id"),
                   "eos_token_id": text_cfg.get("eos_token_id"),
                   "transformers_version": config.get("transformers_version")}
        front = {"license": repo.license, "library_name": repo.library_name, "pipeline_tag": repo.pipeline_tag}
        if repo.gated:
            front["extra_gated_heading"] = f"Access {repo.id} on Hugging Face"
        if repo.base_model:
            front["base_model"] = repo.base_model
        card = "---\n" + "".join(f"{k}: {v}\n" for k, v in front.items() if v) + "---\n\n" + \
            f"# {repo.id.split('/')[-1]}\n\nSandbox copy of the model card (revision {rev_no}).\n"
        files = {
            ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
            "README.md": card.encode(),
            "config.json": (json.dumps(config, indent=2) + "\n").encode(),
            "generation_config.json": (json.dumps(gen_cfg, indent=2) + "\n").encode(),
            "tokenizer_config.json": (json.dumps(tok_cfg, indent=2) + "\n").encode(),
        }
        if shards > 1:
            index = {"metadata": {"total_size": weight_bytes},
                     "weight_map": {"lm_head.weight": list(lfs)[-1], "model.embed_tokens.weight": list(lfs)[0]}}
            files["model.safetensors.index.json"] = (json.dumps(index, indent=2) + "\n").encode()
        return files, lfs

    def _add_catalogue(self, repo_id: str, index: int, meta: dict[str, Any]) -> None:
        created = EPOCH - 86400 * (200 - 7 * index)
        repo = Repo(id=repo_id, params=dict(meta["params"]), gated=meta.get("gated", False),
                    private=meta.get("private", False), pipeline_tag=meta.get("pipeline_tag", "text-generation"),
                    tags=list(meta.get("tags", [])), license=meta.get("license", "apache-2.0"),
                    base_model=meta.get("base_model"), created=created,
                    downloads=int(_sha(repo_id, "dl")[:6], 16) * 3, likes=int(_sha(repo_id, "likes")[:3], 16))
        config = meta["config"]
        if config.get("text_config", {}).get("architectures", 1) is None:
            config = copy.deepcopy(config)
            config["text_config"].pop("architectures")
        history = [("Initial commit", created), ("Upload model weights and tokenizer", created + 3600),
                   ("Update README.md", created + 86400 * 30), ("Update generation_config.json", created + 86400 * 90)]
        with self._lock:
            self.repos[repo_id] = repo
            for n, (title, date) in enumerate(history):
                files, lfs = self._files(repo, config, meta.get("chat_template"), n)
                if n == 0:
                    files, lfs = {".gitattributes": files[".gitattributes"]}, {}
                parent = repo.commits[-1].sha if repo.commits else None
                repo.commits.append(Commit(_sha(repo_id, n), title, date, files, lfs, parent=parent))
            repo.branches["main"] = repo.commits[-1].sha
            repo.tag_refs["v1.0"] = repo.commits[1].sha

    def add_model(self, repo_id: str, *, params: int | dict[str, int] = 7_000_000_000, gated: bool | str = False,
                  private: bool = False, pipeline_tag: str | None = "text-generation",
                  config: dict[str, Any] | None = None, chat_template: str | None = None,
                  tags: list[str] | None = None, license: str = "apache-2.0",  # noqa: A002 - the Hub's field
                  base_model: str | None = None, shard_bytes: int = SHARD_BYTES) -> str:
        """Add (or replace) a repo with one commit on ``main``; returns that commit's sha. A small model
        (``params`` x dtype bytes up to ``DOWNLOADABLE_LFS_BYTES`` a shard) has downloadable weights;
        ``shard_bytes`` splits them as ``save_pretrained(max_shard_size=...)`` does."""
        if gated not in (False, "auto", "manual", True):
            raise ValueError("gated must be False, 'auto' or 'manual'")
        by_dtype = {"BF16": params} if isinstance(params, int) else dict(params)
        repo = Repo(id=repo_id, params=by_dtype, gated="manual" if gated is True else gated, private=private,
                    pipeline_tag=pipeline_tag, tags=list(tags or ["transformers", "safetensors"]), license=license,
                    base_model=base_model, created=time.time(), shard_bytes=shard_bytes)
        cfg = config if config is not None else _llama_cfg(torch_dtype="bfloat16")
        files, lfs = self._files(repo, cfg, chat_template, 0)
        sha = _sha(repo_id, "added", time.time_ns())
        repo.commits.append(Commit(sha, "Upload model", repo.created, files, lfs))
        repo.branches["main"] = sha
        with self._lock:
            self.repos[repo_id] = repo
        return sha

    def push_revision(self, repo_id: str, branch: str = "main", *, title: str = "Update model weights",
                      files: dict[str, bytes | str] | None = None, config: dict[str, Any] | None = None) -> str:
        """A new commit on ``branch`` (created from main if new); returns its sha."""
        with self._lock:
            repo = self._repo(repo_id)
            base_sha = repo.branches.get(branch) or repo.branches["main"]
            base = repo.commit(base_sha)
            new_files = dict(base.files)
            if config is not None:
                new_files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
            for path, data in (files or {}).items():
                new_files[path] = data.encode() if isinstance(data, str) else data
            sha = _sha(repo_id, branch, len(repo.commits), time.time_ns())
            repo.commits.append(Commit(sha, title, time.time(), new_files, dict(base.lfs), parent=base_sha))
            old_sha = repo.branches.get(branch)
            repo.branches[branch] = sha
            hook_args = dict(repo_id=repo.id, private=repo.private, tags=list(repo.tags), head_sha=repo.branches["main"],
                             updated_refs=[{"ref": f"refs/heads/{branch}", "oldSha": old_sha, "newSha": sha}])
        if self._server is not None:
            self.webhooks.repo_content_updated(**hook_args, hub_url=self.url)
        return sha

    def add_tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        with self._lock:
            sha = self.resolve(repo_id, revision)
            self._repo(repo_id).tag_refs[tag] = sha
            return sha

    def set_gated(self, repo_id: str, gated: bool | str) -> None:
        with self._lock:
            self._repo(repo_id).gated = "manual" if gated is True else gated

    def add_token(self, token: str, name: str, *, gated_access: bool = True, granted: set[str] | None = None,
                  orgs: tuple[str, ...] = ()) -> None:
        with self._lock:
            self.users[token] = HubUser(name, name, gated_access=gated_access, granted=set(granted or ()),
                                        orgs=orgs)

    # ---- queries (also used by the model runtime) --------------------------------------------------
    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise KeyError(f"no repo {repo_id} in the sandbox Hub")
        return repo

    def has(self, repo_id: str) -> bool:
        return repo_id in self.repos

    def resolve(self, repo_id: str, revision: str | None = "main") -> str:
        """Branch, tag or commit sha -> commit sha (KeyError if the repo or revision is unknown)."""
        with self._lock:
            repo = self._repo(repo_id)
            rev = revision or "main"
            for prefix, refs in (("refs/heads/", repo.branches), ("refs/tags/", repo.tag_refs)):
                name = rev[len(prefix):] if rev.startswith(prefix) else rev
                if name in refs:
                    return refs[name]
            if any(c.sha == rev for c in repo.commits):
                return rev
            raise KeyError(f"no revision {rev!r} in {repo_id}")

    def params(self, repo_id: str) -> int:
        """Total parameter count as the Hub's safetensors metadata reports it (KeyError if unknown)."""
        with self._lock:
            return self._repo(repo_id).total_params

    def params_by_dtype(self, repo_id: str) -> dict[str, int]:
        with self._lock:
            return dict(self._repo(repo_id).params)

    def weight_bytes(self, repo_id: str) -> int:
        with self._lock:
            return sum(n * DTYPE_BYTES.get(dt, 2) for dt, n in self._repo(repo_id).params.items())

    def file(self, repo_id: str, path: str, revision: str | None = "main") -> bytes:
        with self._lock:
            return self._repo(repo_id).commit(self.resolve(repo_id, revision)).files[path]

    def lfs_bytes(self, repo_id: str, path: str, size: int) -> bytes | None:
        """A weight file's bytes (the same for every revision that keeps it), or None when it is too big to
        serve: a 1 MiB pseudo-random block from the repo and path, repeated."""
        if size > DOWNLOADABLE_LFS_BYTES:
            return None
        import random

        block = random.Random(f"{repo_id}:{path}").randbytes(min(size, 2**20))
        return (block * (size // max(len(block), 1) + 1))[:size]

    def lfs_oid(self, repo_id: str, path: str, size: int) -> str:
        """The file's LFS oid: the sha256 of its bytes (a placeholder for a file too big to serve)."""
        key = (repo_id, path, size)
        with self._lock:
            cached = self._oids.get(key)
        if cached is None:
            data = self.lfs_bytes(repo_id, path, size)
            cached = hashlib.sha256(data if data is not None else f"{repo_id}:{path}".encode()).hexdigest()
            with self._lock:
                self._oids[key] = cached
        return cached

    def config(self, repo_id: str, revision: str | None = "main") -> dict[str, Any]:
        return json.loads(self.file(repo_id, "config.json", revision))

    def chat_template(self, repo_id: str, revision: str | None = "main") -> str | None:
        try:
            return json.loads(self.file(repo_id, "tokenizer_config.json", revision)).get("chat_template")
        except KeyError:
            return None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "url": self._server.url if self._server else None,
                "requests": self._server.request_count if self._server else 0,
                "tokens": {u.name: {"gated_access": u.gated_access, "granted": sorted(u.granted)}
                           for u in self.users.values()},
                "repos": {r.id: {"sha": r.branches.get("main"), "branches": dict(r.branches),
                                 "tags": dict(r.tag_refs), "gated": r.gated, "private": r.private,
                                 "params": r.total_params, "pipeline_tag": r.pipeline_tag,
                                 "commits": len(r.commits)}
                          for r in self.repos.values()},
            }

    # ---- access rules ------------------------------------------------------------------------------
    def user_for(self, auth_header: str | None) -> HubUser | None:
        """None for anonymous; HttpError 401 for an invalid token."""
        if not auth_header:
            return None
        scheme, _, token = auth_header.partition(" ")
        user = self.users.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HttpError(401, INVALID_CREDENTIALS, headers={"X-Error-Message": INVALID_CREDENTIALS})
        return user

    def visible_repo(self, repo_id: str, user: HubUser | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is not None and repo.private and not (user and repo.author in (user.name, *user.orgs)):
            repo = None
        if repo is None:
            msg = "Repository not found"
            # anonymous callers get 401 for missing and private repos alike, like the real Hub
            raise HttpError(401 if user is None else 404, msg,
                            headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": msg})
        return repo

    def check_gated(self, repo: Repo, user: HubUser | None) -> None:
        if not repo.gated or (user is not None and user.can_read_gated(repo.id)):
            return
        if user is None:
            msg = (f"Access to model {repo.id} is restricted. You must have access to it and be authenticated "
                   "to access it. Please log in.")
            raise HttpError(401, msg, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": msg})
        msg = (f"Access to model {repo.id} is restricted and you are not in the authorized list. "
               f"Visit https://huggingface.co/{repo.id} to ask for access.")
        raise HttpError(403, msg, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": msg})

    def resolve_http(self, repo: Repo, revision: str) -> Commit:
        try:
            return repo.commit(self.resolve(repo.id, revision))
        except KeyError:
            msg = f"Invalid rev id: {revision}"
            raise HttpError(404, msg, headers={"X-Error-Code": "RevisionNotFound", "X-Error-Message": msg}) from None

    def model_json(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        config = json.loads(commit.files["config.json"]) if "config.json" in commit.files else {}
        tok = json.loads(commit.files.get("tokenizer_config.json", b"{}"))
        small_config = {k: config[k] for k in ("architectures", "model_type", "quantization_config") if k in config}
        if tok:
            small_config["tokenizer_config"] = {k: tok[k] for k in ("chat_template",) if k in tok}
        siblings = [{"rfilename": p} for p in sorted([*commit.files, *commit.lfs])]
        used = sum(len(b) for b in commit.files.values()) + sum(commit.lfs.values())
        arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
        return {
            "_id": _sha(repo.id, "_id")[:24],
            "id": repo.id,
            "modelId": repo.id,
            "author": repo.author,
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": repo.downloads,
            "downloadsAllTime": repo.downloads * 12,
            "likes": repo.likes,
            "library_name": repo.library_name,
            "tags": list(repo.tags),
            "pipeline_tag": repo.pipeline_tag,
            "mask_token": None,
            "trendingScore": 0,
            "widgetData": [{"text": "Hi, what can you help me with?"}],
            "model-index": None,
            "config": small_config,
            "cardData": {"license": repo.license, "library_name": repo.library_name,
                         "pipeline_tag": repo.pipeline_tag, **({"base_model": repo.base_model}
                                                              if repo.base_model else {})},
            "transformersInfo": {"auto_model": "AutoModelForCausalLM" if "CausalLM" in arch else
                                 "AutoModelForImageTextToText", "pipeline_tag": repo.pipeline_tag,
                                 "processor": "AutoTokenizer"},
            "siblings": siblings,
            "spaces": [],
            "safetensors": {"parameters": dict(repo.params), "total": repo.total_params},
            "usedStorage": used,
            "inference": "warm" if not repo.private else None,
            "baseModels": {"relation": "finetune", "models": [{"id": repo.base_model}]} if repo.base_model else None,
            "childrenModelCount": 0,
            "resourceGroup": None,
            "evalResults": None,
            "gguf": None,
            "inferenceProviderMapping": {},
        }


def _max_len(config: dict[str, Any]) -> int | None:
    value = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(value) if value else None


# ---- HTTP ------------------------------------------------------------------------------------------

_ROUTES: list = []
_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"


class HubHandler(JsonHandler):
    service = "hub"
    routes = _ROUTES
    server: SandboxHTTPServer

    @property
    def hub(self) -> Hub:
        return self.server.state

    def error_body(self, err: HttpError) -> Any:
        return err.body if err.body is not None else {"error": err.message}

    def user(self):
        return self.hub.user_for(self.headers.get("Authorization"))


@route(_ROUTES, "GET", r"/api/whoami-v2")
def _whoami(h: HubHandler):
    user = h.user()
    if user is None:
        raise HttpError(401, "Invalid username or password.")
    return {
        "type": "user", "id": _sha("user", user.name)[:24], "name": user.name, "fullname": user.fullname,
        "email": f"{user.name}@example.com", "emailVerified": True, "canPay": False, "isPro": False,
        "periodEnd": None, "avatarUrl": "https://cdn-avatars.huggingface.co/v1/production/uploads/none.png",
        "orgs": [{"type": "org", "name": o, "fullname": o.title(), "id": _sha("org", o)[:24], "roleInOrg": "write"}
                 for o in user.orgs],
        "auth": {"type": "access_token", "accessToken": {"displayName": f"{user.name}-token", "role": user.role,
                                                         "createdAt": _iso(EPOCH)}},
    }


@route(_ROUTES, "GET", rf"/api/models/{_REPO}/auth-check(?:/write)?")
def _auth_check(h: HubHandler, repo: str):
    user = h.user()
    with h.hub._lock:
        r = h.hub.visible_repo(repo, user)
        if h.path.split("?")[0].endswith("/write") and (
                user is None or r.author not in (user.name, *user.orgs) or user.role != "write"):
            raise HttpError(403, "You don't have write access to this repo.")
        h.hub.check_gated(r, user)
    return {}


@route(_ROUTES, "GET", rf"/api/models/{_REPO}/refs")
def _refs(h: HubHandler, repo: str):
    user = h.user()
    with h.hub._lock:
        r = h.hub.visible_repo(repo, user)
        return {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in r.branches.items()],
            "converts": [],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in r.tag_refs.items()],
            "pullRequests": [],
        }


@route(_ROUTES, "GET", rf"/api/models/{_REPO}/commits/(?P<rev>[^/]+)")
def _commits(h: HubHandler, repo: str, rev: str):
    user = h.user()
    with h.hub._lock:
        r = h.hub.visible_repo(repo, user)
        head = h.hub.resolve_http(r, unquote(rev))
        # git log: that commit and its ancestors, newest first (a commit pushed to another branch is not
        # in this one's history, as on the Hub)
        line, sha = [], head.sha
        while sha is not None:
            c = r.commit(sha)
            line.append(c)
            sha = c.parent
        return [{"id": c.sha, "title": c.title, "message": "", "authors": [{"user": c.author, "avatar": None}],
                 "date": _iso(c.date)} for c in line]


@route(_ROUTES, "GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")
def _tree(h: HubHandler, repo: str, rev: str, path: str | None = None):
    user = h.user()
    with h.hub._lock:
        r = h.hub.visible_repo(repo, user)
        commit = h.hub.resolve_http(r, unquote(rev))
        prefix = (unquote(path).strip("/") + "/") if path else ""
        out = []
        for p, data in sorted(commit.files.items()):
            if p.startswith(prefix):
                out.append({"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": p})
        for p, size in sorted(commit.lfs.items()):
            if p.startswith(prefix):
                oid = h.hub.lfs_oid(r.id, p, size)
                out.append({"type": "file", "oid": _sha(r.id, p), "size": size, "path": p,
                            "lfs": {"oid": oid, "size": size, "pointerSize": 135}})
        if prefix and not out:
            msg = f"{path} does not exist on \"{rev}\""
            raise HttpError(404, msg, headers={"X-Error-Code": "EntryNotFound", "X-Error-Message": msg})
        return out


@route(_ROUTES, "GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)")
def _model_info_rev(h: HubHandler, repo: str, rev: str):
    return _model_info(h, repo, unquote(rev))


@route(_ROUTES, "GET", rf"/api/models/{_REPO}")
def _model_info(h: HubHandler, repo: str, rev: str = "main"):
    user = h.user()
    expand = h.query.get("expand", []) + h.query.get("expand[]", [])
    unknown = [e for e in expand if e not in EXPAND_FIELDS]
    if unknown:
        raise HttpError(400, f'"expand" must be one of {", ".join(EXPAND_FIELDS)}; got {unknown[0]!r}')
    with h.hub._lock:
        r = h.hub.visible_repo(repo, user)
        commit = h.hub.resolve_http(r, rev)
        data = h.hub.model_json(r, commit)
    if expand:
        return {"_id": data["_id"], "id": data["id"], **{k: data.get(k) for k in expand}}
    default = ("_id", "id", "private", "pipeline_tag", "library_name", "tags", "downloads", "likes", "modelId",
               "author", "sha", "lastModified", "gated", "disabled", "widgetData", "model-index", "config",
               "cardData", "transformersInfo", "siblings", "spaces", "safetensors", "createdAt", "usedStorage",
               "inference")
    return {k: data[k] for k in default}


@route(_ROUTES, "GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
def _resolve(h: HubHandler, repo: str, rev: str, path: str):
    user = h.user()
    revision, filename = unquote(rev), unquote(path)
    with h.hub._lock:
        r = h.hub.visible_repo(repo, user)
        h.hub.check_gated(r, user)
        commit = h.hub.resolve_http(r, revision)
        data = commit.files.get(filename)
        size = commit.lfs.get(filename)
        if data is None and size is not None and size <= DOWNLOADABLE_LFS_BYTES:
            # an LFS file: the Hub answers 302 to its storage (a signed URL), naming the file's sha256 and size
            oid = h.hub.lfs_oid(r.id, filename, size)
            h.body_bytes()
            h.send_text(302, b"", headers={
                "Location": f"{h.hub._storage.url}/sandbox-lfs/{quote(r.id, safe='')}/{quote(filename, safe='')}/{size}/{oid}",
                "X-Repo-Commit": commit.sha, "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(size),
                "ETag": f'"{oid}"'})
            return None
        if data is None:
            msg = (f"Weight files over {DOWNLOADABLE_LFS_BYTES >> 20} MiB are not downloadable from the sandbox "
                   f"Hub: {filename}" if filename in commit.lfs else "Entry not found")
            raise HttpError(404, msg, headers={"X-Error-Code": "EntryNotFound", "X-Error-Message": msg})
    ctype = "application/json; charset=utf-8" if filename.endswith(".json") else "text/plain; charset=utf-8"
    h.send_text(200, data, content_type=ctype, headers={
        "ETag": f'"{git_blob_oid(data)}"',
        "X-Repo-Commit": commit.sha,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'inline; filename*=UTF-8\'\'{quote(filename.rsplit("/", 1)[-1])}; '
                               f'filename="{filename.rsplit("/", 1)[-1]}";',
        "Cache-Control": "public, max-age=0",
    })
    return None


class LfsStorageHandler(JsonHandler):
    """The host the Hub redirects LFS downloads to (fault service ``"hub"`` too)."""

    service = "hub"
    routes: list = []

    @property
    def hub(self) -> Hub:
        return self.server.state


@route(LfsStorageHandler.routes, "GET", r"/sandbox-lfs/(?P<repo>[^/]+)/(?P<path>[^/]+)/(?P<size>\d+)/(?P<oid>[0-9a-f]{64})")
def _lfs_storage(h: LfsStorageHandler, repo: str, path: str, size: str, oid: str):
    """Where the Hub's 302 points (its storage behind a signed URL: no token needed); ``Range`` as a CDN does."""
    repo_id, filename = unquote(repo), unquote(path)
    data = h.hub.lfs_bytes(repo_id, filename, int(size))
    if data is None or h.hub.lfs_oid(repo_id, filename, int(size)) != oid:
        raise HttpError(404, "Not Found")
    status, headers = 200, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
    if m and int(m.group(1)) < len(data):
        first = int(m.group(1))
        last = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
        headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        data, status = data[first:last + 1], 206
    h.send_text(status, data, content_type="application/octet-stream", headers=headers)
    return None
