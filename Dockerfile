# The flows image: what a Prefect `kubernetes` work pool runs each flow run in (deploy/prefect.gke.yaml).
#   docker build -t us-docker.pkg.dev/PROJECT/llm-fleet/flows:$(git rev-parse --short HEAD) .
# The code lives at /opt/llm-fleet, the pull step's working directory (deploy/gke_variant.py).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/llm-fleet/.venv \
    PATH=/opt/llm-fleet/.venv/bin:$PATH \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

RUN pip install --no-cache-dir "uv==0.13.9" \
 && useradd --create-home --uid 10001 llm-fleet
WORKDIR /opt/llm-fleet

# Locked dependencies first (cached while only the code changes); prefect-gcp for GcpCredentials blocks.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --extra gcp --no-install-project

COPY llm_fleet ./llm_fleet
COPY servers ./servers
COPY flows ./flows
COPY targets ./targets
COPY tasks ./tasks
COPY manifests ./manifests
COPY sandbox ./sandbox
COPY deployments ./deployments
COPY deploy ./deploy
COPY prefect.yaml ./
RUN uv sync --frozen --no-dev --extra gcp && chown -R llm-fleet /opt/llm-fleet

USER 10001
# No entrypoint: the Prefect worker sets the flow-run command (`prefect flow-run execute`).
CMD ["llm-fleet", "--help"]
