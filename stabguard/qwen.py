"""Qwen's chat template, tokenizer and Qwen3-VL processor, rebuilt offline.

A real checkpoint ships these files, but the tiny CPU model and the tests must not need the hub. So
the Qwen3-VL chat template is kept here verbatim, with Qwen's added tokens in their real order, and
two tokenizers are built on Qwen's text pipeline: a small demo BPE trained on a built-in PCB corpus
(what the tiny model ships) and the real Qwen BPE from the ranks the ``dashscope`` package carries
(the real ids, to test against real tokenization).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers
from transformers import PreTrainedTokenizerFast, Qwen3VLProcessor

# The Qwen3-VL Instruct chat template, verbatim as shipped with Qwen/Qwen3-VL-8B-Instruct (two public
# copies agreed byte for byte). No default system prompt; Instruct models never emit <think>.
QWEN3VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen's added tokens in id order from 151643, with their `special` flag (special ones are skipped by
# decode(skip_special_tokens=True); tool/think markers are plain added tokens in the real tokenizer).
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
QWEN_FIRST_ADDED_ID = 151643
QWEN_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Shipped Qwen3-VL image limits: 64 to 16384 merged tokens per image (1024 pixels per token).
QWEN3VL_MIN_PIXELS = 64 * 32 * 32
QWEN3VL_MAX_PIXELS = 16384 * 32 * 32

_DEMO_TEXT = """\
Inspect this PCB. Defect: open circuit. Defect: short circuit. Defect: mouse bite. Defect: spur.
Defect: spurious copper. Defect: pin hole. Defect: missing hole. No defect found; the board is clean.
You are a helpful assistant that inspects printed circuit boards for manufacturing defects.
The user shows an image of a board and the assistant answers with the defect type and its location.
Look at the copper traces, pads, vias, solder mask and silkscreen. Report every box as JSON.
{"bbox_2d": [120, 48, 161, 90], "label": "short"} {"bbox_2d": [300, 512, 339, 547], "label": "open"}
The trace between the two pads is broken, so the circuit is open. A thin bridge of copper joins two
traces: that is a short. A bite taken out of the edge of a trace is a mouse bite; a small spike of
extra copper is a spur. Where copper should not be at all, it is spurious copper. A pin hole is a
tiny void in the copper. Is this board good? Yes. Which defects do you see, and where are they?
system user assistant tool image video text template reference test train validation sample batch
about above across after again against all almost alone along already also although always among
amount analysis angle another answer any appear apply area around arrive ask assembly attach automatic
back bad balance base because become before begin behind below best better between big black blue
body bottom bright bring build but call camera can capacitor careful carry case cause center change
check choose circle class clear close color come common compare complete component condition connect
consider contain continue control correct cost could count cover create crack current cut damage dark
data day decide deep describe design detail detect develop device different direction distance do
down draw drill during each early easy edge effect either electric element else end enough error even
every example expect explain face fact factory fail far fast feature few field figure file fill final
find fine first fix flat follow form found frame free from front full function gap general give glass
go great green grid ground group grow half hand happen hard have heat help here high hold hole how
however idea if important include increase input inside instead into issue item just keep kind know
large last later layer lead learn least leave left length less level light like line list little long
loss low machine main make many mark match material may mean measure metal method middle might model
more most move much must name narrow near need network never new next noise normal not number object
off often only open order other outside over own pair panel part pass path pattern per picture piece
place plane plate point position possible power press print probably problem process produce product
quality question quick rate read real reason record red region remove repair repeat result right ring
rough round rule run same scale scan second section select sensor set shape sharp should show side
signal simple single size small smooth solder some space speed square stage standard start state step
still stop strong structure surface switch system table take test than that then there these thick
thin this through time together top total track trace true turn under unit until upper use usual value
very view voltage wall want way weak well what when where which while white why wide width will wire
with within without word work would wrong year yellow yes yet zero zone
"""
_DEMO_DEFECTS = ("open circuit", "short", "mouse bite", "spur", "spurious copper", "pin hole")
_DEMO_PARTS = ("resistor", "capacitor", "connector", "chip", "via", "pad", "trace", "ground plane")


def _demo_corpus() -> list[str]:
    """Lines for the demo BPE: fixed prose plus every defect/part pairing, so common words merge."""
    lines = _DEMO_TEXT.splitlines()
    for defect in _DEMO_DEFECTS:
        for part in _DEMO_PARTS:
            lines.append(f"user: Inspect this PCB.\nassistant: Defect: {defect} near the {part}.\n")
    return lines


def _qwen_pipeline(backend: Tokenizer) -> Tokenizer:
    """Qwen's text pipeline around a BPE model: NFC, regex split, byte-level mapping and decoding."""
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_qwen_tokens(backend: Tokenizer) -> Tokenizer:
    """Append Qwen's added tokens after the BPE vocabulary, one by one so each keeps Qwen's order."""
    for content, special in QWEN_ADDED_TOKENS:
        token = AddedToken(content, normalized=False, special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
    return backend


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap like Qwen's tokenizer_config: eos <|im_end|>, pad <|endoftext|>, no bos, no unk."""
    specials = [content for content, special in QWEN_ADDED_TOKENS[1:] if special]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=262144,
    )
    tokenizer.chat_template = QWEN3VL_CHAT_TEMPLATE
    return tokenizer


def build_demo_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A small byte-level BPE with Qwen's special tokens, trained on a built-in PCB corpus.

    Deterministic (same corpus, same trainer settings, same ids every build); the 256 byte symbols are
    in the alphabet, so any unicode text encodes. Special tokens follow the BPE vocabulary in Qwen's
    order, as in the real tokenizer.
    """
    backend = _qwen_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_demo_corpus(), trainer=trainer)
    return _wrap(_add_qwen_tokens(backend))


def _qwen_tiktoken_path() -> Path:
    """Where the `dashscope` package keeps Qwen's BPE ranks; a clear error when it is not installed."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "build_qwen_tokenizer needs the Qwen BPE file shipped in the `dashscope` package "
            "(resources/qwen.tiktoken); install it with `pip install dashscope`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Qwen BPE ranks not found in the installed dashscope package")
    return path


def _read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a .tiktoken file (`base64-token rank` per line) without needing tiktoken itself."""
    ranks = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def _qwen_backend_json() -> str:
    """The Qwen backend as tokenizers JSON; cached because deriving 151k merges takes seconds."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(_read_tiktoken_ranks)

    converter = _Converter(vocab_file=str(_qwen_tiktoken_path()), pattern=QWEN_SPLIT_PATTERN)
    return _add_qwen_tokens(_qwen_pipeline(converter.converted())).to_str()


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The real Qwen tokenizer rebuilt offline: Qwen BPE ranks from `dashscope` + special tokens at
    their real ids (151643 <|endoftext|> ... 151668 </think>)."""
    tokenizer = _wrap(Tokenizer.from_str(_qwen_backend_json()))
    ids = tokenizer.convert_tokens_to_ids([token for token, _ in QWEN_ADDED_TOKENS])
    wrong = [tok for i, (tok, _) in enumerate(QWEN_ADDED_TOKENS) if ids[i] != QWEN_FIRST_ADDED_ID + i]
    if wrong:
        raise RuntimeError(f"qwen.tiktoken: special tokens landed at unexpected ids: {wrong}")
    return tokenizer


def build_processor(
    tokenizer: Any, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> Qwen3VLProcessor:
    """A Qwen3-VL processor assembled locally (patch 16, merge 2, temporal patch 2, mean/std 0.5).

    Pixel limits default to the shipped ones (64 to 16384 tokens per image); pass small ones for CPU.
    The video processor is required by Qwen3VLProcessor even for image-only data.
    """
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    size = {
        "shortest_edge": min_pixels or QWEN3VL_MIN_PIXELS,
        "longest_edge": max_pixels or QWEN3VL_MAX_PIXELS,
    }
    image_processor = Qwen2VLImageProcessor(
        size=size, patch_size=16, temporal_patch_size=2, merge_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(), chat_template=QWEN3VL_CHAT_TEMPLATE,
    )
