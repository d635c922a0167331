"""Hypothesis strategies for Qwen-style conversations, as the built-in mask tests use them.

A conversation is a sample dict (``id``, ``messages``, ``images``) in the format the data readers give
the collator: an optional system turn, 1-4 user/assistant rounds, up to 3 images (PIL) spread over the
user turns. Text is unicode with newlines, empty replies, role words ("assistant\\n", "user") and
near-misses of template markers ("<|assistant|>", "<|im_start>assistant", "<|IM_END|>"). Exact special
tokens are left out: the collator refuses those by design. Needs ``hypothesis`` (``pip install hypothesis``)::

    from hypothesis import given
    from stabguard.testing.strategies import batches

    @given(samples=batches)
    def test_my_collator_supervises_only_replies(samples): ...
"""

from __future__ import annotations

import re

from hypothesis import strategies as st
from PIL import Image

from stabguard.qwen import QWEN_ADDED_TOKENS

SPECIAL = re.compile("|".join(re.escape(t) for t, special in QWEN_ADDED_TOKENS if special))
ROLE_WORDS = ["assistant\n", "user\n", "system\n", "assistant", "user:", "Assistant: ", "<think>\n", "</think>"]
NEAR_MISSES = ["<|assistant|>", "<|im_start>assistant", "<|im_start|", "im_end|>", "<|IM_END|>", "<im_end>",
               "<|image|>", "<|vision_start>", "<|endoftext>", "<tool_call>", "<|im_sep|>", "[INST]", *ROLE_WORDS]
IMAGE_SIZES = [(32, 32), (48, 32), (32, 64), (64, 64)]

pieces = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
                   st.sampled_from(NEAR_MISSES), st.sampled_from(["\n", "\n\n", " ", "\t", "\r\n", " \n "]))
#: Turn text: unicode, whitespace, role words and near-miss markers; never an exact special token.
texts = st.lists(pieces, max_size=4).map("".join).filter(lambda t: not SPECIAL.search(t))
#: Assistant replies: like ``texts``, empty ones included.
replies = st.one_of(st.just(""), texts)


@st.composite
def conversations(draw, sid: str = "s0", max_images: int = 3) -> dict:
    """A sample dict: optional system turn, 1-4 rounds, at most ``max_images`` images over the user turns."""
    system = draw(st.none() | texts)
    messages = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
    images, budget = [], max_images
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(0, budget))
        budget -= n
        sizes = [draw(st.sampled_from(IMAGE_SIZES)) for _ in range(n)]
        items = [{"type": "image", "image": f"{sid}-{len(images) + k}.png"} for k in range(n)]
        items = draw(st.permutations(items + [{"type": "text", "text": draw(texts)}]))
        images += [Image.new("RGB", size, (len(images) * 40 % 255, 120, 60)) for size in sizes]
        messages.append({"role": "user", "content": items})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": draw(replies)}]})
    return {"id": sid, "messages": messages, "images": images}


#: A micro-batch: 1-3 conversations with ids s0, s1, s2.
batches = st.integers(1, 3).flatmap(lambda n: st.tuples(*(conversations(f"s{i}") for i in range(n))).map(list))


def replies_of(sample: dict) -> list[str]:
    """The assistant replies of a sample dict, in order (what the loss must see, plus end tokens)."""
    return [m["content"][0]["text"] for m in sample["messages"] if m["role"] == "assistant"]
