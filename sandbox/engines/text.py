"""What the sandbox's models say: deterministic text derived from the prompt (no ML), and the engines' chat
templates.

"What is X?" → "X is ...", a PaliGemma ``![](.../rabbit.png)caption en\\n`` → "image of a rabbit ..."
(detect/segment answers in PaliGemma's ``<locNNNN>`` format). :func:`count_tokens` stands in for a
tokenizer (words and punctuation); :func:`plan_completion` cuts the answer at ``stop`` strings and
``max_tokens`` and says why it ended (``stop`` / ``length``); :func:`render_chat` renders messages the way
the model family's chat template does (Gemma ``<start_of_turn>``, Llama 3 header ids, Mistral/Llama 2
``[INST]``, ChatML ``<|im_start|>``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

_IMG = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_WORD = re.compile(r"\w+|[^\w\s]")
_PIECE = re.compile(r"\s*\S+")
_CHAT_MARKUP = re.compile(
    r"<start_of_turn>(?:user|model)\n|<end_of_turn>\n?|<bos>|<s>|</s>|\[/?INST\]|<\|im_start\|>(?:system|user|assistant)\n?"
    r"|<\|im_end\|>\n?|<\|begin_of_text\|>|<\|start_header_id\|>\w+<\|end_header_id\|>\n*|<\|eot_id\|>")

_FILLERS = (
    "{T} is usually explained in terms of its purpose, its main parts and how they fit together.",
    "In practice, most people start with a small example and grow from there.",
    "The key ideas are easy to state: keep things simple, measure what matters and automate the repetitive parts.",
    "A good first step is to read the official documentation and try the basic workflow end to end.",
    "Over time, hands-on experience with real workloads matters more than any single tool.",
    "There are trade-offs between cost, speed and reliability, and the right balance depends on the use case.",
    "Many teams also write down what they learn, so that others can benefit from it.",
    "It helps to compare a few options before committing to one.",
    "{T} keeps evolving, so it is worth revisiting the basics from time to time.",
    "Clear goals and short feedback loops make the biggest difference.",
    "Starting small also makes it easier to notice problems early and fix them cheaply.",
    "Most of the difficulty is in the details, which only show up once you try it for real.",
    "If you are unsure where to begin, pick one concrete problem and solve it well.",
    "Good tooling helps, but clear thinking about the problem helps more.",
)
_SUBJECTS = ("cat sitting on a windowsill", "red car parked on a street", "dog running on a beach",
             "bowl of fruit on a wooden table", "mountain lake at sunset", "man in a spacesuit")
_CONTINUATIONS = (
    " place that many people know from pictures, but it is worth a closer look.",
    " good example of something that is simple to describe and hard to master.",
    " topic that comes up often, and for good reasons.",
    " subject with a long history and plenty of surprises.",
)


def _h(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def count_tokens(text: str) -> int:
    """A stable stand-in for a tokenizer: words and punctuation marks, at least one."""
    return max(1, len(_WORD.findall(text)))


def _user_text(prompt: str) -> str:
    text = _CHAT_MARKUP.sub(" ", prompt)
    return re.sub(r"[ \t]+", " ", text).strip()


_TOPIC_STOP = {"if", "when", "because", "so", "important", "necessary", "useful", "good", "better", "worth",
               "in", "for", "to", "with", "that", "and", "or", "vs", "versus", "really", "still", "always"}


def _topic(question: str) -> str:
    q = re.sub(r"[?.!]+$", "", question.strip())
    q = re.sub(r"(?i)^(please |can you |could you |tell me |explain |describe )+", "", q)
    about = re.search(r"(?i)\babout (.+)$", q)
    if about:
        q = about.group(1)
    q = re.sub(r"(?i)^(what|who|why|how|where|when|which)( (is|are|was|were|do|does|did|can|should))?"
               r"( (i|you|we|they))?\s+", "", q)
    q = re.sub(r"(?i)^(write|explain|describe|list|give|summarize|tell)( me)?\s+", "", q)
    q = re.sub(r"(?i)\s+(is|are|was|were)( (a|an|the))?$", "", q)
    q = re.sub(r"(?i)^(is|are|do|does|can|should|will|would|could)\s+", "", q)
    q = re.sub(r"(?i)^(the|a|an)\s+", "", q)
    words = []
    for w in q.split():
        if w.lower().strip(",;") in _TOPIC_STOP:
            break
        words.append(w.strip(",;"))
    return " ".join(words[:5]) or "this"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _subject_from_url(url: str) -> str | None:
    if url.startswith("data:"):
        return None
    stem = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    words = [w for w in re.split(r"[-_\s%0-9]+", stem.lower()) if w.isalpha() and len(w) > 1]
    return " ".join(words[:3]) or None


def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _vision_answer(task: str, images: list[str], seed: int) -> str:
    subject = next((s for s in (_subject_from_url(u) for u in images) if s), None)
    thing = _article(subject) if subject else _article(_SUBJECTS[seed % len(_SUBJECTS)])
    t = task.strip().lower()
    if t.startswith(("detect", "segment")):
        objs = [o.strip() for o in task.split(None, 1)[1].split(";")] if " " in task.strip() else ["object"]
        locs = []
        for i, o in enumerate(objs):
            n = [(seed >> (10 * (i * 4 + k))) % 1024 for k in range(4)]
            y0, x0 = min(n[0], n[2]), min(n[1], n[3])
            y1, x1 = max(n[0], n[2]) + 1, max(n[1], n[3]) + 1
            locs.append(f"<loc{y0:04d}><loc{x0:04d}><loc{min(y1, 1023):04d}><loc{min(x1, 1023):04d}> {o}")
        return " ; ".join(locs)
    if t.startswith("answer"):
        q = t.split(None, 2)[2] if len(t.split(None, 2)) > 2 else ""
        if q.startswith(("is ", "are ", "does ", "do ", "can ")):
            return "yes"
        if q.startswith("how many"):
            return str(1 + seed % 3)
        return thing
    if t.startswith("ocr"):
        return "sandbox"
    details = ("", " in the grass", " on a white background", " next to a tree", " on a wooden floor")
    return f"image of {thing}{details[seed % len(details)]}"


def compose_answer(prompt: str, model_id: str = "", *, sample: int = 0) -> str:
    """The whole answer the model would give to ``prompt`` (deterministic; truncated by the caller); ``sample``
    k > 0 is the k-th other draw of a sampling request (``n`` > 1 with temperature > 0 gives distinct choices)."""
    seed = _h(model_id, prompt) if not sample else _h(model_id, prompt, str(sample))
    images = _IMG.findall(prompt)
    text = _user_text(_IMG.sub(" ", prompt))
    vision = "paligemma" in model_id.lower()
    if images or (vision and re.match(r"(?i)^(caption|describe|answer|detect|segment|ocr)\b", text)):
        return _vision_answer(text, images, seed)
    q = text.strip()
    topic = _topic(q)
    fill = [f.replace("{T}", _cap(topic)) for f in _FILLERS]
    if topic == "this" or re.search(r"(?i)\b(hello|hi|hey)\b", q):
        fill = [f for f in _FILLERS if "{T}" not in f]
    order = sorted(range(len(fill)), key=lambda i: _h(str(seed), str(i)))
    if not q:
        head = "I am ready to help. Ask me anything."
    elif re.search(r"(?i)\b(say )?(hello|hi|hey)\b", q) and len(q.split()) <= 12:
        head = "Hello! It's nice to meet you. How can I help you today?"
    elif q.endswith("?"):
        if re.match(r"(?i)^(what|who) (is|are|was|were)\b", q):
            head = f"{_cap(topic)} is a widely used concept, and the short answer is that it helps people get a job done."
        elif re.match(r"(?i)^(is|are|do|does|can|should|will|would|could)\b", q):
            head = "Yes. In short, it matters, although how much depends on your goals."
        elif re.match(r"(?i)^how\b", q):
            head = f"Here is a short overview of how to {topic[:1].lower() + topic[1:]}."
        elif re.match(r"(?i)^why\b", q):
            head = f"There are a few reasons why {topic}."
        else:
            head = f"Good question. {_cap(topic)} deserves a careful answer."
    elif re.search(r"(?i)\b(is|are) (a|an|the)$", q) or q.endswith((" is", " are", " was")):
        head = _CONTINUATIONS[seed % len(_CONTINUATIONS)].strip()
        return " " + head + " " + " ".join(fill[i] for i in order[:3])
    elif q.endswith((".", "!", ":")) or re.match(r"(?i)^(write|explain|describe|list|give|summarize|tell)\b", q):
        head = f"Sure. Here is a short answer about {topic}." if topic != "this" else "Sure. Here is my answer."
    else:
        return " " + _CONTINUATIONS[seed % len(_CONTINUATIONS)].strip() + " " + \
            " ".join(fill[i] for i in order[:3])
    n = 2 + seed % 4
    if vision:
        n = 1
    return head + " " + " ".join(fill[i] for i in order[:n])


def split_pieces(text: str) -> list[str]:
    """Text as token-like pieces (a word with its leading space); ``"".join`` gives the text back."""
    pieces = _PIECE.findall(text)
    if pieces and len("".join(pieces)) < len(text):
        pieces[-1] += text[len("".join(pieces)):]
    return pieces


@dataclass
class Completion:
    pieces: list[str]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"
    stop_reason: str | None = None  # vLLM: the stop string that ended the output (None: EOS or length)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def plan_completion(prompt: str, model_id: str, max_tokens: int, *, stop: list[str] | None = None,
                    wrong: bool = False, image_tokens: int = 0, sample: int = 0) -> Completion:
    prompt_tokens = count_tokens(prompt) + image_tokens + 1  # + BOS
    max_tokens = max(0, int(max_tokens))
    if wrong:
        return Completion([""] * max_tokens, prompt_tokens, "length")
    answer = compose_answer(prompt, model_id, sample=sample)
    finish, stopped_by = "stop", None
    hits = sorted((answer.index(s), s) for s in stop or [] if s and s in answer)
    if hits:  # the first stop string the output reaches ends it (vLLM reports it as stop_reason)
        at, stopped_by = hits[0]
        answer = answer[:at]
    pieces = split_pieces(answer)
    if len(pieces) > max_tokens:
        pieces, finish, stopped_by = pieces[:max_tokens], "length", None
    return Completion(pieces, prompt_tokens, finish, stopped_by)


def _family(model_id: str, config: dict[str, Any] | None) -> str:
    mt = str((config or {}).get("model_type", "")).lower()
    mid = model_id.lower()
    if "gemma" in mt or "gemma" in mid:
        return "gemma"
    if "llama-3" in mid or "llama3" in mid:
        return "llama3"
    if mt in ("llama", "mistral") or "llama" in mid or "mistral" in mid:
        return "inst"
    return "chatml"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content or []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "") if isinstance(part.get("image_url"), dict) \
                else str(part.get("image_url"))
            parts.append(f"![]({url})")
    return "".join(parts)


def render_chat(messages: list[dict[str, Any]], family: str) -> str:
    out = []
    for m in messages:
        role, text = m.get("role", "user"), _content_text(m.get("content"))
        if family == "gemma":
            out.append(f"<start_of_turn>{'model' if role == 'assistant' else 'user'}\n{text}<end_of_turn>\n")
        elif family == "inst":
            out.append(f"[INST] {text} [/INST]" if role != "assistant" else f" {text}</s>")
        elif family == "llama3":
            out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>")
        else:
            out.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
    gen = {"gemma": "<start_of_turn>model\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
           "chatml": "<|im_start|>assistant\n", "inst": ""}[family]
    return "".join(out) + gen
