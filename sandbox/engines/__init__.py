"""The sandbox's model servers: vLLM, TGI and SGLang (and any other image) as live loopback HTTP servers per
pod, without a GPU. One module per thing emulated:

* ``runtime`` — :class:`ModelRuntime`: what the kube controller and Vertex call to start a pod's server;
  load time, auto-OOM, the Hub facts an engine reads at start.
* ``container`` — :func:`describe_container`: engine, model, port ... from a pod's first container (pure).
* ``checks`` — the argument checks the engines run at start, with their own messages.
* ``behaviors`` — :class:`Behaviors`: failure modes per pod (``crash_loop``, ``oom``, ``hang`` ...).
* ``podserver`` — one container's server process: loading, start-up logs, crashes, batching, pacing.
* ``openai_api`` — the OpenAI-compatible routes the engines share.
* ``vllm``, ``tgi``, ``sglang``, ``generic`` — each engine's own HTTP API.
* ``text`` — deterministic answers (:func:`compose_answer`), token counts, chat templates.
* ``metrics`` — Prometheus histograms and exposition for ``/metrics``.
"""

# Import circle, on purpose and inside this component only: runtime imports each engine's handler module to
# start a pod's server, and those import podserver/runtime back for the pod's state (one component, split by
# what each module emulates). tests/unit/test_imports.py checks no circle leaves a sandbox component.

from sandbox.engines.behaviors import Behavior, Behaviors
from sandbox.engines.container import ContainerInfo, describe_container
from sandbox.engines.podserver import PodServer
from sandbox.engines.runtime import ModelRuntime
from sandbox.engines.text import compose_answer

__all__ = ["Behavior", "Behaviors", "ContainerInfo", "ModelRuntime", "PodServer", "compose_answer",
           "describe_container"]
