"""Routing: which provider serves a request, in the design's order, and why.

Order: (1) the provider/model the request names; (2) data residency (request or user setting);
(3) the query type (code / analytical / general) mapped to the user's preferred provider;
(4) the user's default; then (5) a fallback chain, used when the chosen provider fails before
its first token. Every decision carries a human-readable reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pacore.errors import BadRequestError, NotFoundError

__all__ = [
    "EXEMPLARS",
    "QueryClassifier",
    "QueryType",
    "RouteDecision",
    "RoutingContext",
    "Target",
    "choose_route",
    "keyword_query_type",
    "parse_model",
]

QueryType = Literal["code", "analytical", "general"]
Residency = Literal["any", "on_prem"] | list[str] | None

AGENT_PREFIX = "agent:"


@dataclass(frozen=True, slots=True)
class Target:
    """One concrete place to send a request: a provider name, its kind and the model."""

    provider: str
    kind: str
    model: str | None = None
    on_prem: bool = False
    region: str | None = None

    @property
    def is_agent(self) -> bool:
        return self.provider.startswith(AGENT_PREFIX)

    @property
    def agent_id(self) -> str:
        return self.provider[len(AGENT_PREFIX):]


@dataclass(frozen=True, slots=True)
class RouteDecision:
    target: Target
    reason: str
    fallbacks: tuple[Target, ...] = ()
    query_type: QueryType | None = None


@dataclass(slots=True)
class RoutingContext:
    """What routing may choose from: the user's reachable targets (in order of preference when
    nothing else decides: the user's own providers first) and preferences."""

    targets: dict[str, Target]
    default_provider: str | None = None
    data_residency: Residency = "any"
    routing: dict[str, str | None] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


def parse_model(model: str | None) -> tuple[str | None, str | None]:
    """``"openai/gpt-4o"`` → (``"openai"``, ``"gpt-4o"``); ``"auto"`` or None → (None, None);
    a bare model name → (None, name)."""
    if not model or model == "auto":
        return None, None
    if "/" in model:
        provider, _, rest = model.partition("/")
        return provider, rest or None
    return None, model


def _allowed(target: Target, residency: Residency) -> bool:
    if residency in (None, "any"):
        return True
    if residency == "on_prem":
        return target.on_prem
    return target.on_prem or (target.region is not None and target.region in residency)


def _residency_label(residency: Residency) -> str:
    if residency is None or isinstance(residency, str):
        return str(residency or "any")
    return "regions " + ",".join(residency)


def choose_route(
    ctx: RoutingContext,
    *,
    provider: str | None = None,
    model: str | None = None,
    residency: Residency = None,
    query_type: QueryType | None = None,
) -> RouteDecision:
    """Apply the routing order. Raises NotFoundError for an unknown named provider and
    BadRequestError when nothing the user has satisfies the constraints."""
    named_provider, named_model = parse_model(model)
    if provider and named_provider and provider != named_provider:
        raise BadRequestError(
            f"'provider' ({provider}) and 'model' ({model}) name different providers",
            param="provider",
        )
    provider = provider or named_provider
    residency = residency if residency is not None else ctx.data_residency

    if provider:
        target = ctx.targets.get(provider)
        if target is None:
            raise NotFoundError(f"provider '{provider}' is not configured", param="provider")
        if not _allowed(target, residency):
            raise BadRequestError(
                f"provider '{provider}' does not satisfy data residency "
                f"{_residency_label(residency)}",
                param="data_residency",
            )
        return RouteDecision(
            _with_model(target, named_model),
            "named by the request",
            _fallbacks(ctx, target, residency),
        )

    allowed = {n: t for n, t in ctx.targets.items() if _allowed(t, residency)}
    if not allowed:
        if residency not in (None, "any"):
            raise BadRequestError(
                f"no configured provider satisfies data residency {_residency_label(residency)}",
                param="data_residency",
            )
        raise BadRequestError(
            "no provider is configured: add one with PUT /v1/providers/{name}", param="provider"
        )

    chosen: Target | None = None
    reason = ""
    if query_type is not None:
        preferred = ctx.routing.get(query_type)
        if preferred and preferred in allowed:
            chosen, reason = allowed[preferred], f"query type '{query_type}' preference"
    if chosen is None and ctx.default_provider and ctx.default_provider in allowed:
        chosen, reason = allowed[ctx.default_provider], "the user's default provider"
    if chosen is None:
        # Targets come in the user's order of ownership: their own providers first, then what
        # the platform offers (shared, self-hosted), then agents.
        name = next(iter(allowed))
        chosen, reason = allowed[name], "the only provider available" if len(allowed) == 1 else (
            "first available provider (no default set)"
        )
    if residency not in (None, "any"):
        reason += f"; data residency {_residency_label(residency)}"
    return RouteDecision(
        _with_model(chosen, named_model), reason, _fallbacks(ctx, chosen, residency), query_type
    )


def _with_model(target: Target, model: str | None) -> Target:
    if model is None:
        return target
    return Target(target.provider, target.kind, model, target.on_prem, target.region)


def _fallbacks(ctx: RoutingContext, chosen: Target, residency: Residency) -> tuple[Target, ...]:
    out: list[Target] = []
    for name in ctx.fallbacks:
        t = ctx.targets.get(name)
        if t is not None and t.provider != chosen.provider and _allowed(t, residency):
            out.append(t)
    return tuple(out)


# --------------------------------------------------------------------------- query type

EXEMPLARS: dict[QueryType, tuple[str, ...]] = {
    "code": (
        "How do I sort a list in Python?",
        "Fix this bug in my JavaScript function",
        "Write a SQL query that joins two tables",
        "Why does this code throw a NullPointerException?",
        "Implement a binary search tree in Rust",
        "Refactor this class to use dependency injection",
        "What does this regular expression match?",
        "Convert this bash script to Python",
        "How do I make an HTTP request with fetch in TypeScript?",
        "Explain this stack trace and how to fix the compile error",
    ),
    "analytical": (
        "Compare the pros and cons of these two investment strategies",
        "Analyze the sales figures for last quarter and find trends",
        "What is the expected value of this bet?",
        "Estimate the market size for electric bikes in Europe",
        "Evaluate the statistical significance of these survey results",
        "Break down the root causes of the decline in revenue",
        "Calculate the compound interest over ten years",
        "Assess the risks of expanding into a new market",
        "Which of these three options is the most cost effective and why?",
        "Summarize the key differences between these research findings",
    ),
    "general": (
        "Write a short poem about autumn",
        "What is the capital of France?",
        "Tell me a joke",
        "Suggest a name for my cat",
        "How are you today?",
        "Translate 'good morning' into Spanish",
        "Recommend a good book to read on holiday",
        "What's a good recipe for dinner tonight?",
        "Write a friendly email inviting my team to lunch",
        "Who painted the Mona Lisa?",
    ),
}

_CODE_WORDS = re.compile(
    r"\b(code|function|bug|python|javascript|typescript|java|rust|golang|sql|regex|compile|"
    r"stack ?trace|exception|class|method|api|script|debug|refactor|algorithm|def|import)\b|[{};]|"
    r"```",
    re.IGNORECASE,
)
_ANALYTICAL_WORDS = re.compile(
    r"\b(analy[sz]e|analysis|compare|comparison|evaluate|estimate|calculate|statistic\w*|"
    r"trend|forecast|pros and cons|trade-?offs?|risk|data|metric|percentage|probability)\b",
    re.IGNORECASE,
)


def keyword_query_type(text: str) -> QueryType:
    """The fallback classifier: keyword counts, code first."""
    code = len(_CODE_WORDS.findall(text))
    analytical = len(_ANALYTICAL_WORDS.findall(text))
    if code and code >= analytical:
        return "code"
    if analytical:
        return "analytical"
    return "general"


class QueryClassifier:
    """Nearest labelled exemplars by cosine similarity of (normalised) embeddings.

    The exemplar vectors are computed once by the caller's embedder; a query vector is compared
    with every exemplar and the label of the top-k majority (weighted by similarity) wins. Below
    ``min_similarity`` the embedding says too little and the keyword fallback decides.
    """

    def __init__(
        self,
        exemplar_vectors: Mapping[QueryType, Sequence[Sequence[float]]],
        *,
        k: int = 5,
        min_similarity: float = 0.2,
    ) -> None:
        labels = [label for label, vs in exemplar_vectors.items() for _ in vs]
        rows = [v for vs in exemplar_vectors.values() for v in vs]
        self._labels: list[QueryType] = labels
        self._matrix = _normalise(np.asarray(rows, dtype=np.float32)) if rows else None
        self._k = k
        self._min = min_similarity

    def classify(self, vector: Sequence[float] | None, text: str) -> tuple[QueryType, str]:
        """The query type and how it was decided (``embedding`` or ``keywords``)."""
        if vector is None or self._matrix is None:
            return keyword_query_type(text), "keywords"
        q = _normalise(np.asarray(vector, dtype=np.float32)[None, :])[0]
        scores = self._matrix @ q
        top = np.argsort(-scores)[: self._k]
        if scores[top[0]] < self._min:
            return keyword_query_type(text), "keywords"
        votes: dict[QueryType, float] = {}
        for i in top:
            label = self._labels[int(i)]
            votes[label] = votes.get(label, 0.0) + float(scores[i])
        return max(votes, key=lambda label: votes[label]), "embedding"


def _normalise(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms == 0, 1.0, norms)
