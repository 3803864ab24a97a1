"""Where the product's endpoints and credentials come from: the environment (or a .env file).

Real GCP is the default; `llm-fleet sandbox up` writes an env file that points every endpoint at
the loopback sandbox. Nothing else differs between the two.
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLM_FLEET_", extra="ignore")

    # Google Cloud: None = the real googleapis endpoints.
    gke_endpoint: str | None = None
    compute_endpoint: str | None = None
    # Vertex AI (None = https://REGION-aiplatform.googleapis.com) and Cloud Quotas (Vertex GPU quota).
    vertex_endpoint: str | None = None
    # Cloud Storage's JSON API (None = https://storage.googleapis.com): mirror_model's bucket.
    storage_endpoint: str | None = None
    # Artifact Registry's REST API (repositories): the image's mirror.
    artifactregistry_endpoint: str = "https://artifactregistry.googleapis.com"
    cloudquotas_endpoint: str = "https://cloudquotas.googleapis.com"
    # Managed Prometheus' query API (PromQL; canary analysis): /v1/projects/P/location/global/prometheus/...
    monitoring_endpoint: str = "https://monitoring.googleapis.com"
    # adc = Application Default Credentials; anonymous = sandbox; block = a prefect-gcp GcpCredentials block.
    gcp_auth: Literal["adc", "anonymous", "block"] = "adc"
    gcp_credentials_block: str | None = None
    # Cluster APIs are https with the cluster's CA (from GKE's masterAuth) and a bearer token: a Google
    # access token from the credentials above, refreshed before expiry; or, when set, the Kubernetes
    # ServiceAccount token in this file (e.g. the operator account's, or in-cluster
    # /var/run/secrets/kubernetes.io/serviceaccount/token).
    kube_token_file: Path | None = None
    kube_dir: Path = Path.home() / ".llm-fleet" / "kube"

    hf_endpoint: str = Field("https://huggingface.co", validation_alias=AliasChoices("HF_ENDPOINT",
                                                                                       "LLM_FLEET_HF_ENDPOINT"))
    hf_token: SecretStr | None = Field(None, validation_alias=AliasChoices("HF_TOKEN", "LLM_FLEET_HF_TOKEN"))

    # Where a spec named by an event (trigger, webhook) may live (manifests/triggers.py); empty =
    # the bundled deployments/. Colon-separated in the environment: LLM_FLEET_TRUSTED_SPEC_DIRS=/a:/b.
    trusted_spec_dirs: Annotated[list[Path], NoDecode] = []

    slack_token: SecretStr | None = Field(None, validation_alias=AliasChoices("SLACK_BOT_TOKEN",
                                                                              "LLM_FLEET_SLACK_TOKEN"))
    # A Prefect Secret block holding the Slack bot token, read when the flow runs (when SLACK_BOT_TOKEN is
    # unset): only its name is configuration, so the token is never resolved into a deployment's stored
    # job variables (a "{{ prefect.blocks.secret.x }}" template is, at deploy time: PrefectHQ/prefect#14088).
    slack_token_block: str | None = None
    slack_api_url: str = "https://slack.com/api/"
    slack_channel: str = "#llm-fleet"

    # Retries of transient errors (429, 5xx, network): exponential backoff with jitter.
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0
    retry_deadline_s: float = 300.0
    call_timeout_s: float = 60.0
    task_retries: int = 3

    # Long-running GKE operations: polled with backoff (not busy-polled) up to this long.
    operation_timeout_s: float = 3600.0
    poll_initial_s: float = 2.0
    poll_max_s: float = 15.0
    # Sandbox only: multiply model-load timeouts (the sandbox's clock is scaled), with a floor so
    # scheduling jitter on a busy machine is not mistaken for a slow model.
    time_scale: float = 1.0
    min_load_timeout_s: float = 0.0

    def load_timeout_s(self, cloud: timedelta) -> float:
        """A spec's load timeout as seconds to wait here: on the sandbox's clock, never under the floor."""
        return max(cloud.total_seconds() * self.time_scale, self.min_load_timeout_s)

    @field_validator("trusted_spec_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: object) -> object:
        return [p for p in value.split(":") if p] if isinstance(value, str) else value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reload_settings() -> Settings:
    get_settings.cache_clear()
    return get_settings()
