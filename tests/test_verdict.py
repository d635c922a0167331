import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stabguard.verdict import Action, Verdict, combine

verdicts = st.one_of(
    st.none(),
    st.builds(Verdict, action=st.sampled_from(list(Action)), reason=st.text(max_size=10),
              guard=st.sampled_from(["", "a", "b"])),
)


@settings(deadline=None, max_examples=200)
@given(st.lists(verdicts, max_size=6))
def test_combine_keeps_the_most_severe(vs):
    result = combine(vs)
    given_actions = [v.action for v in vs if v is not None]
    assert result.action == max(given_actions, default=Action.PROCEED)


@settings(deadline=None, max_examples=100)
@given(st.lists(verdicts, max_size=6), st.randoms())
def test_combine_ignores_order(vs, rnd):
    shuffled = list(vs)
    rnd.shuffle(shuffled)
    assert combine(vs).action == combine(shuffled).action


def test_reasons_of_the_winning_severity_are_joined():
    out = combine([Verdict.skip("nan loss", "nonfinite"), Verdict.stop("too many", "spike"),
                   Verdict.stop("bad data", "mine"), None])
    assert out.action == Action.STOP
    assert "spike: too many" in out.reason and "mine: bad data" in out.reason
    assert "nan loss" not in out.reason
    assert out.guard == ("spike", "mine") and out.by == "spike,mine"


def test_a_guard_returning_something_else_is_named():
    with pytest.raises(TypeError, match="a hook returned 'skip please'"):
        combine([Verdict.proceed(), "skip please"])


def test_decided_by_names_each_guard_of_a_combined_verdict():
    out = combine([Verdict.skip("a", "nonfinite"), Verdict.skip("b", "spike")])
    assert out.decided_by("spike") and out.decided_by("nonfinite") and not out.decided_by("grad_norm")
    assert not Verdict.proceed().decided_by("")
