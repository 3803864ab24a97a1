"""A run's story: named steps with timings, mirrored to one Slack thread and to Prefect artifacts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from manifests.errors import FleetError
from tasks.settings import get_settings
from tasks.slack import open_thread, post_slack, update_slack

ICONS = {"running": "⏳", "ok": "✅", "failed": "❌", "skipped": "⏭️"}


@dataclass
class Step:
    name: str
    status: str = "running"
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Ended:
    """What a ``Report.run`` block leaves behind when its failure was settled as the run's outcome."""

    state: Any = None  # the run's final state (an automatic rollback's Failed), for the caller to return


@dataclass
class Report:
    """Create one per flow run. ``secrets`` are scrubbed from everything it writes anywhere."""

    flow: str
    subject: str
    channel: str | None = None
    secrets: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    ts: str | None = None
    status: str = "running"
    outcome: str = ""
    channel_id: str | None = None  # from the first post: updates and replies address the channel by ID

    def __post_init__(self) -> None:
        self.channel = self.channel or get_settings().slack_channel
        thread = open_thread(channel=self.channel, text=self._text())
        if thread is not None:
            self.channel_id, self.ts = thread

    def scrub(self, text: str) -> str:
        return scrub_text(text, self.secrets)

    def _text(self) -> str:
        head = f"{ICONS.get(self.status, '')} *{self.flow}* `{self.subject}` — {self.status}"
        lines = [head] + [f"{ICONS[s.status]} {s.name}" + (f": {s.detail}" if s.detail else "")
                          + (f" ({s.seconds:.1f}s)" if s.status != "running" else "") for s in self.steps]
        if self.outcome:
            lines.append(self.outcome)
        return self.scrub("\n".join(lines))

    def _sync(self) -> None:
        if self.ts and self.channel_id:
            update_slack(channel=self.channel_id, ts=self.ts, text=self._text())

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        """Run a named step; its result is written in place in the Slack thread head."""
        step = Step(name)
        self.steps.append(step)
        self._sync()
        start = time.monotonic()
        try:
            yield step
        except BaseException as exc:
            step.status = "failed"
            step.detail = step.detail or _one_line(exc)
            raise
        else:
            if step.status == "running":
                step.status = "ok"
        finally:
            step.seconds = time.monotonic() - start
            get_run_logger().info("%s %s %s", ICONS[step.status], name, self.scrub(step.detail))
            self._sync()

    def note(self, text: str) -> None:
        """A reply in the run's Slack thread (what a reader must not miss, e.g. where traffic went)."""
        get_run_logger().info("%s", self.scrub(text))
        if self.ts and self.channel_id:
            post_slack(channel=self.channel_id, thread_ts=self.ts, text=self.scrub(text))

    def skip(self, name: str, why: str) -> None:
        self.steps.append(Step(name, "skipped", why))
        self._sync()

    def succeed(self, outcome: str) -> None:
        self.status, self.outcome = "succeeded", outcome
        self._sync()

    def fail(self, exc: BaseException) -> None:
        scrub_exception(exc, self.secrets)  # the flow re-raises it: Prefect's state message is str(exc)
        self.status = "failed"
        fix = exc.fix if isinstance(exc, FleetError) and exc.fix else "see the Prefect flow run logs"
        self.outcome = f"Cause: {_one_line(exc)}"
        self._sync()
        if self.ts and self.channel_id:
            post_slack(channel=self.channel_id, thread_ts=self.ts,
                       text=self.scrub(f"❌ {self.flow} failed: {exc}\nNext step: {fix}"))

    @contextmanager
    def run(self, artifact: str, *, before_fail: Callable[[Exception, Report], None] | None = None,
            settle: Callable[[Exception, Report], Any] | None = None) -> Iterator[Ended]:
        """A flow run's body: a failure is told (``fail``: the thread's outcome, a reply with the fix) and
        raised again, and the run's Markdown artifact ``artifact`` is written either way.
        ``before_fail(exc, report)`` adds to the exception first; ``settle(exc, report)`` may make the failure
        an outcome instead (an automatic rollback): it returns the run's final state, which is left in
        ``Ended.state`` for the caller to return after the block (the exception is not raised again)."""
        ended = Ended()
        try:
            yield ended
        except Exception as exc:
            if before_fail is not None:
                before_fail(exc, self)
            self.fail(exc)
            if settle is not None and (state := settle(exc, self)) is not None:
                ended.state = state
                return
            raise
        finally:
            self.markdown_artifact(artifact)

    def table_artifact(self, key: str, rows: list[dict], description: str) -> None:
        clean = [{k: self.scrub(str(v)) for k, v in r.items()} for r in rows]
        create_table_artifact(key=key, table=clean, description=self.scrub(description))

    def markdown_artifact(self, key: str, extra: str = "") -> None:
        lines = [f"# {self.flow}: `{self.subject}` — {self.status}", "", "| step | result | detail | seconds |",
                 "|---|---|---|---|"]
        lines += [f"| {s.name} | {ICONS[s.status]} {s.status} | {s.detail} | {s.seconds:.1f} |" for s in self.steps]
        if self.outcome:
            lines += ["", self.outcome]
        if extra:
            lines += ["", extra]
        create_markdown_artifact(key=key, markdown=self.scrub("\n".join(lines)), description=self.flow)


def secret_forms(secret: str) -> list[str]:
    """A secret as it can appear in text: itself and base64 (std/url-safe, padded or not, at any of the
    three byte alignments inside a longer base64 blob such as a Secret's data), longest first."""
    import base64

    raw = secret.encode()
    forms = {secret}
    if len(raw) >= 8:  # short values would blank out ordinary words
        for k in range(3):
            enc = base64.b64encode(b"\0" * k + raw).decode()
            core = enc[-(-8 * k // 6):(8 * (k + len(raw))) // 6] if k else enc
            for form in (core, core.rstrip("=")):
                forms |= {form, form.replace("+", "-").replace("/", "_")}
    return sorted((f for f in forms if f), key=len, reverse=True)


def scrub_text(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            for form in secret_forms(secret):
                text = text.replace(form, "***")
    return text


def scrub_exception(exc: BaseException, secrets: list[str], _seen: set[int] | None = None) -> None:
    """Scrub an exception in place (args, and the FleetError/ApiException fields its str() is made of)."""
    import contextlib

    seen = _seen if _seen is not None else set()
    if id(exc) in seen:
        return
    seen.add(id(exc))
    exc.args = tuple(scrub_text(a, secrets) if isinstance(a, str) else a for a in exc.args)
    for attr in ("problem", "fix", "reason", "body", "message", "server_message"):
        value = getattr(exc, attr, None)
        if isinstance(value, str):
            with contextlib.suppress(AttributeError):  # a read-only property
                setattr(exc, attr, scrub_text(value, secrets))
    for chained in (exc.__cause__, exc.__context__):
        if chained is not None:
            scrub_exception(chained, secrets, seen)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]
