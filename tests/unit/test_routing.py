"""Routing order, residency, query types and the classifier."""

from __future__ import annotations

import pytest

from pacore.errors import BadRequestError, NotFoundError
from pacore.routing import (
    QueryClassifier,
    RoutingContext,
    Target,
    choose_route,
    keyword_query_type,
    parse_model,
)


def ctx(**kw) -> RoutingContext:
    targets = {
        "openai": Target("openai", "openai", "gpt-4o"),
        "claude": Target("claude", "anthropic", "claude-sonnet", region="eu"),
        "agent:a1": Target("agent:a1", "agent", "llama3", on_prem=True),
    }
    return RoutingContext(targets=targets, **kw)


def test_parse_model():
    assert parse_model("openai/gpt-4o") == ("openai", "gpt-4o")
    assert parse_model("agent:a1/llama3") == ("agent:a1", "llama3")
    assert parse_model("auto") == (None, None)
    assert parse_model(None) == (None, None)
    assert parse_model("gpt-4o") == (None, "gpt-4o")


def test_named_provider_wins_over_everything():
    d = choose_route(ctx(default_provider="openai", routing={"code": "openai"}),
                     provider="claude", query_type="code")
    assert d.target.provider == "claude" and d.reason == "named by the request"


def test_model_names_provider_and_model():
    d = choose_route(ctx(), model="agent:a1/mistral")
    assert d.target.provider == "agent:a1" and d.target.model == "mistral"


def test_conflicting_provider_and_model():
    with pytest.raises(BadRequestError):
        choose_route(ctx(), provider="openai", model="claude/x")


def test_unknown_provider_is_not_found():
    with pytest.raises(NotFoundError):
        choose_route(ctx(), provider="nope")


def test_residency_on_prem_picks_agents_only():
    d = choose_route(ctx(default_provider="openai"), residency="on_prem")
    assert d.target.provider == "agent:a1" and "on_prem" in d.reason
    with pytest.raises(BadRequestError):
        choose_route(ctx(), provider="openai", residency="on_prem")


def test_residency_region_list():
    d = choose_route(ctx(default_provider="openai"), residency=["eu"])
    assert d.target.provider in ("claude", "agent:a1")
    assert d.target.provider != "openai"


def test_residency_from_user_setting():
    d = choose_route(ctx(default_provider="openai", data_residency="on_prem"))
    assert d.target.on_prem


def test_residency_nothing_allowed():
    c = RoutingContext(targets={"openai": Target("openai", "openai")}, data_residency="on_prem")
    with pytest.raises(BadRequestError) as info:
        choose_route(c)
    assert info.value.param == "data_residency"


def test_query_type_preference_then_default():
    c = ctx(default_provider="openai", routing={"code": "claude"})
    assert choose_route(c, query_type="code").target.provider == "claude"
    d = choose_route(c, query_type="general")
    assert d.target.provider == "openai" and "default" in d.reason


def test_no_providers():
    with pytest.raises(BadRequestError):
        choose_route(RoutingContext(targets={}))


def test_fallbacks_exclude_chosen_and_respect_residency():
    c = ctx(default_provider="openai", fallbacks=["openai", "claude", "agent:a1", "missing"])
    d = choose_route(c)
    assert [t.provider for t in d.fallbacks] == ["claude", "agent:a1"]
    d = choose_route(c, residency="on_prem")
    assert d.target.provider == "agent:a1" and d.fallbacks == ()


def test_keyword_classifier():
    assert keyword_query_type("fix this python function, it throws an exception") == "code"
    assert keyword_query_type("compare the pros and cons and estimate the risk") == "analytical"
    assert keyword_query_type("write me a poem about the sea") == "general"


def test_embedding_classifier_votes_and_falls_back():
    exemplars = {
        "code": [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]],
        "analytical": [[0.0, 1.0, 0.0]],
        "general": [[0.0, 0.0, 1.0]],
    }
    clf = QueryClassifier(exemplars, k=2, min_similarity=0.5)
    assert clf.classify([0.95, 0.05, 0.0], "anything") == ("code", "embedding")
    assert clf.classify([0.0, 0.1, 1.0], "anything") == ("general", "embedding")
    # Nothing similar enough: the keywords decide.
    assert clf.classify([-1.0, -1.0, -1.0], "debug this regex") == ("code", "keywords")
    assert clf.classify(None, "tell me a joke") == ("general", "keywords")


def test_without_preferences_the_first_target_wins():
    """Targets arrive in order of ownership (the user's own providers before the platform's)."""
    c = RoutingContext(targets={
        "zz-mine": Target("zz-mine", "openai"),
        "cpu": Target("cpu", "cpu", "tiny", on_prem=True),
    })
    d = choose_route(c)
    assert d.target.provider == "zz-mine" and "first available" in d.reason
