"""The HF Hub emulator through the real huggingface_hub client (HfApi, hf_hub_download) over HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from sandbox.core import Faults
from sandbox.hub import CATALOGUE, Hub

READ, NOGATE = "hf_sandbox_read", "hf_sandbox_nogate"


@pytest.fixture
def hub():
    h = Hub(faults=Faults())
    h.start()
    yield h
    h.stop()


def api(hub: Hub, token: str | bool = READ) -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def test_whoami_valid_and_invalid_tokens(hub):
    me = api(hub).whoami()
    assert me["name"] == "sandbox-user" and me["type"] == "user"
    assert [o["name"] for o in me["orgs"]] == ["sandbox-org"]
    assert me["auth"]["accessToken"]["role"] == "read"
    assert api(hub, NOGATE).whoami()["name"] == "sandbox-nogate"
    with pytest.raises(HfHubHTTPError) as info:
        api(hub, "hf_not_a_real_token").whoami()
    assert info.value.response.status_code == 401
    assert "Invalid user token" in str(info.value)


@pytest.mark.parametrize(("repo", "params", "gated", "tag"), [
    ("google/paligemma2-3b-pt-224", {"BF16": 3032242416}, "manual", "image-text-to-text"),
    ("google/gemma-2-2b-it", {"BF16": 2614341888}, "manual", "text-generation"),
    ("meta-llama/Llama-2-7b-chat-hf", {"F16": 6738415616}, "manual", "text-generation"),
    ("mistralai/Mistral-7B-v0.1", {"BF16": 7241732096}, False, "text-generation"),
    ("Qwen/Qwen2.5-7B-Instruct", {"BF16": 7615616512}, False, "text-generation"),
    ("meta-llama/Llama-3.1-70B-Instruct", {"BF16": 70553706496}, "manual", "text-generation"),
    ("TheBloke/Llama-2-7B-Chat-AWQ", {"I32": 865075200, "F16": 263458816}, False, "text-generation"),
])
def test_model_info_expand_safetensors_and_gating(hub, repo, params, gated, tag):
    # metadata of gated repos is public on the real Hub: even the no-gate token reads it
    info = api(hub, NOGATE).model_info(repo, revision="main", expand=["safetensors", "gated", "sha", "pipeline_tag"])
    assert info.id == repo
    assert info.safetensors.parameters == params
    assert info.safetensors.total == sum(params.values()) == hub.params(repo)
    assert info.gated == gated
    assert info.pipeline_tag == tag
    assert len(info.sha) == 40 and info.sha == hub.resolve(repo, "main")
    assert info.tags is None and info.siblings is None  # not expanded: not sent


def test_model_info_default_fields(hub):
    info = api(hub).model_info("google/gemma-2-2b-it")
    assert info.config["model_type"] == "gemma2"
    assert "chat_template" in info.config["tokenizer_config"]
    files = {s.rfilename for s in info.siblings}
    assert {"config.json", "tokenizer_config.json", "model-00001-of-00002.safetensors"} <= files
    assert info.safetensors.total == 2614341888
    assert "conversational" in info.tags and info.card_data.license == "gemma"
    assert info.last_modified is not None and info.created_at is not None
    assert len(CATALOGUE) >= 12


def test_revisions_resolve_to_commit_shas(hub):
    a = api(hub)
    refs = a.list_repo_refs("google/gemma-2-2b-it")
    main_sha = next(b.target_commit for b in refs.branches if b.name == "main")
    tag_sha = next(t.target_commit for t in refs.tags if t.name == "v1.0")
    assert main_sha != tag_sha
    assert a.model_info("google/gemma-2-2b-it", revision="main").sha == main_sha
    assert a.model_info("google/gemma-2-2b-it", revision="v1.0").sha == tag_sha
    assert a.model_info("google/gemma-2-2b-it", revision=tag_sha).sha == tag_sha
    assert a.model_info("google/gemma-2-2b-it", revision="refs/heads/main").sha == main_sha
    commits = a.list_repo_commits("google/gemma-2-2b-it")
    assert commits[0].commit_id == main_sha and tag_sha in [c.commit_id for c in commits]
    with pytest.raises(RevisionNotFoundError):
        a.model_info("google/gemma-2-2b-it", revision="does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        a.model_info("google/gemma-2-2b-it", revision="refs/pr/1")


def test_unknown_and_private_repos(hub):
    with pytest.raises(RepositoryNotFoundError) as info:
        api(hub).model_info("nobody/no-such-model")
    assert info.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError) as info:
        api(hub, False).model_info("nobody/no-such-model")
    assert info.value.response.status_code == 401  # anonymous: 401, like the real Hub
    private = "sandbox-org/gemma-2-2b-it-support"
    assert api(hub).model_info(private).private is True
    with pytest.raises(RepositoryNotFoundError):
        api(hub, NOGATE).model_info(private)


def test_invalid_token_is_refused_everywhere(hub):
    with pytest.raises(HfHubHTTPError) as info:
        api(hub, "hf_bad").model_info("mistralai/Mistral-7B-v0.1")
    assert info.value.response.status_code == 401
    assert not isinstance(info.value, RepositoryNotFoundError | GatedRepoError)
    assert info.value.response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"


def test_auth_check_gated_access(hub):
    api(hub).auth_check("google/gemma-2-2b-it")
    api(hub, NOGATE).auth_check("Qwen/Qwen2.5-7B-Instruct")  # not gated: fine
    with pytest.raises(GatedRepoError) as info:
        api(hub, NOGATE).auth_check("meta-llama/Llama-2-7b-chat-hf")
    assert info.value.response.status_code == 403
    with pytest.raises(GatedRepoError) as info:
        api(hub, False).auth_check("meta-llama/Llama-2-7b-chat-hf")
    assert info.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        api(hub).auth_check("nobody/no-such-model")
    hub.add_token("hf_one_grant", "grantee", gated_access=False, granted={"google/gemma-2-2b-it"})
    api(hub, "hf_one_grant").auth_check("google/gemma-2-2b-it")
    with pytest.raises(GatedRepoError):
        api(hub, "hf_one_grant").auth_check("google/gemma-2-9b-it")


def test_hf_hub_download_config(hub, tmp_path):
    a = api(hub)
    path = a.hf_hub_download("google/gemma-2-2b-it", "config.json", cache_dir=tmp_path)
    cfg = json.loads(Path(path).read_text())
    assert cfg["model_type"] == "gemma2" and cfg["max_position_embeddings"] == 8192
    assert cfg["torch_dtype"] == "bfloat16"
    assert hub.resolve("google/gemma-2-2b-it") in path  # snapshots/<commit sha>/config.json
    old = a.hf_hub_download("google/gemma-2-2b-it", "config.json", revision="v1.0", cache_dir=tmp_path)
    assert hub.resolve("google/gemma-2-2b-it", "v1.0") in old
    # the module-level function with endpoint=, and the text_config of a VLM
    p = hf_hub_download("google/paligemma2-3b-pt-224", "config.json", endpoint=hub.url, token=READ,
                        cache_dir=tmp_path)
    assert json.loads(Path(p).read_text())["text_config"]["max_position_embeddings"] == 8192
    tok = json.loads(Path(a.hf_hub_download("Qwen/Qwen2.5-7B-Instruct", "tokenizer_config.json",
                                            cache_dir=tmp_path)).read_text())
    assert "<|im_start|>" in tok["chat_template"]
    with pytest.raises(GatedRepoError):
        api(hub, NOGATE).hf_hub_download("google/gemma-2-2b-it", "config.json", cache_dir=tmp_path / "n")
    with pytest.raises(EntryNotFoundError):
        a.hf_hub_download("google/gemma-2-2b-it", "model-00001-of-00002.safetensors", cache_dir=tmp_path / "w")
    assert a.file_exists("google/gemma-2-2b-it", "config.json")


def test_push_revision_moves_main_and_keeps_history(hub):
    a = api(hub)
    before = a.model_info("Qwen/Qwen2.5-7B-Instruct", expand=["sha"]).sha
    new = hub.push_revision("Qwen/Qwen2.5-7B-Instruct")
    assert new != before and len(new) == 40
    assert a.model_info("Qwen/Qwen2.5-7B-Instruct", revision="main", expand=["sha"]).sha == new
    assert a.model_info("Qwen/Qwen2.5-7B-Instruct", revision=before, expand=["sha"]).sha == before
    assert a.list_repo_commits("Qwen/Qwen2.5-7B-Instruct")[0].commit_id == new
    dev = hub.push_revision("Qwen/Qwen2.5-7B-Instruct", branch="dev", config={"model_type": "qwen2", "x": 1})
    assert a.model_info("Qwen/Qwen2.5-7B-Instruct", revision="dev").sha == dev
    assert hub.config("Qwen/Qwen2.5-7B-Instruct", "dev")["x"] == 1
    assert {b.name for b in a.list_repo_refs("Qwen/Qwen2.5-7B-Instruct").branches} == {"main", "dev"}
    # git history: each branch lists its own commits and their ancestors, never another branch's.
    newer = hub.push_revision("Qwen/Qwen2.5-7B-Instruct")
    main_log = [c.commit_id for c in a.list_repo_commits("Qwen/Qwen2.5-7B-Instruct", revision="main")]
    dev_log = [c.commit_id for c in a.list_repo_commits("Qwen/Qwen2.5-7B-Instruct", revision="dev")]
    assert main_log[:2] == [newer, new] and dev not in main_log
    assert dev_log[:2] == [dev, new] and newer not in dev_log


def test_add_model(hub):
    sha = hub.add_model("sandbox-org/tiny-llama", params=1_100_048_384, gated="auto", chat_template="{{ x }}")
    info = api(hub).model_info("sandbox-org/tiny-llama", expand=["safetensors", "gated", "sha"])
    assert info.sha == sha and info.safetensors.total == 1_100_048_384 == hub.params("sandbox-org/tiny-llama")
    assert info.gated == "auto"
    with pytest.raises(GatedRepoError):
        api(hub, NOGATE).auth_check("sandbox-org/tiny-llama")
    with pytest.raises(ValueError):
        hub.add_model("x/y", gated="sometimes")


def test_faults_status_and_latency(hub):
    hub.faults.add(service="hub", path=r"^/api/models/", status=503, count=2)
    for _ in range(2):
        with pytest.raises(HfHubHTTPError) as info:
            api(hub).model_info("mistralai/Mistral-7B-v0.1")
        assert info.value.response.status_code == 503
    assert api(hub).model_info("mistralai/Mistral-7B-v0.1").id == "mistralai/Mistral-7B-v0.1"
    hub.faults.add(service="hub", path=r"whoami", latency=0.2, count=1)
    t0 = time.perf_counter()
    api(hub).whoami()
    assert time.perf_counter() - t0 >= 0.2
    assert [r["hits"] for r in hub.faults.list()] == [2, 1]


def test_snapshot(hub):
    api(hub).whoami()
    snap = hub.snapshot()
    assert snap["requests"] >= 1
    assert snap["repos"]["google/gemma-2-2b-it"]["params"] == 2614341888
    assert snap["repos"]["google/gemma-2-2b-it"]["gated"] == "manual"
    json.dumps(snap)
