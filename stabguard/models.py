"""Model and processor loading: real Qwen3-VL checkpoints, 4-bit, LoRA, and tiny random models for CPU.

Everything here works offline. A tiny random Qwen3-VL (a few hundred thousand parameters) is built
locally with a small byte-level BPE tokenizer and a locally assembled processor, saved like a real
checkpoint, and loaded back through ``from_pretrained`` -- so the demo and the 32B run share one path.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLProcessor

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
# Tiny-model defaults when none are given: 4 to 64 tokens per image keeps CPU steps fast.
TINY_MIN_PIXELS = 4 * 32 * 32
TINY_MAX_PIXELS = 64 * 32 * 32

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


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in Qwen3-VL's 24:20:20 proportion."""
    half = head_dim // 2
    hw = round(half * 20 / 64)
    return [half - 2 * hw, hw, hw]


def _tiny_text_config(tokenizer: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 8192, "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.pad_token_id,
    }


def _tiny_vision_config() -> dict[str, Any]:
    return {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 256,
        "deepstack_visual_indexes": [1],
    }


def _unknown_keys(where: str, keys: Any, config_cls: type, extra: set[str]) -> list[str]:
    """Keys a config class would silently keep as stray attributes; each named by its recipe key."""
    fields = getattr(config_cls, "__dataclass_fields__", None)
    if fields is None:  # a transformers release without dataclass configs: nothing to check against
        return []
    return [f"{where}{k}" for k in keys if k not in fields and k not in extra]


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Nested text_config/vision_config dicts go to the sub-configs, other keys to Qwen3VLConfig;
    a typo fails here, naming the key, instead of being kept as an attribute nothing reads."""
    from transformers import Qwen3VLTextConfig, Qwen3VLVisionConfig

    top = dict(overrides)
    text = dict(top.pop("text_config", None) or {})
    vision = dict(top.pop("vision_config", None) or {})
    unknown = (
        _unknown_keys("model.tiny.text_config.", text, Qwen3VLTextConfig, {"eos_token_id", "bos_token_id"})
        + _unknown_keys("model.tiny.vision_config.", vision, Qwen3VLVisionConfig, set())
        + _unknown_keys("model.tiny.", top, Qwen3VLConfig, set())
    )
    if unknown:
        raise ValueError(
            "unknown tiny-model override(s): " + ", ".join(unknown) + "; text keys go under "
            "text_config and vision keys under vision_config, e.g. tiny = {text_config = {hidden_size = 32}}"
        )
    return text, vision, top


def tiny_config(tokenizer: Any, **overrides: Any) -> Qwen3VLConfig:
    """A tiny random Qwen3-VL shape (text 64x2 layers, vision 32x2 blocks) sized to `tokenizer`.

    `overrides`: {"text_config": {...}, "vision_config": {...}} and/or top-level Qwen3VLConfig keys.
    The vision output width follows the text hidden size, and the M-RoPE split follows head_dim,
    unless they are overridden themselves.
    """
    text_over, vision_over, top = _split_overrides(overrides)
    text = {**_tiny_text_config(tokenizer), **text_over}
    text.setdefault("rope_parameters", {
        "rope_type": "default", "rope_theta": 5_000_000.0,
        "mrope_section": _mrope_section(text["head_dim"]), "mrope_interleaved": True,
    })
    vision = {**_tiny_vision_config(), "out_hidden_size": text["hidden_size"], **vision_over}
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision, **{**ids, **top})


def build_tiny_model(
    out_dir: str | Path, *, seed: int = 0, overrides: dict[str, Any] | None = None,
    min_pixels: int | None = None, max_pixels: int | None = None,
) -> Path:
    """Build a tiny random Qwen3-VL (float32, deterministic by `seed`) with the demo tokenizer and a
    local processor, and save both into `out_dir` like a real checkpoint, so the rest of stabguard
    loads it through `from_pretrained` exactly as it loads Qwen/Qwen3-VL-32B-Instruct."""
    from transformers import Qwen3VLForConditionalGeneration

    out = Path(out_dir)
    tokenizer = build_demo_tokenizer()
    processor = build_processor(
        tokenizer, min_pixels=min_pixels or TINY_MIN_PIXELS, max_pixels=max_pixels or TINY_MAX_PIXELS
    )
    config = tiny_config(tokenizer, **(overrides or {}))
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"stabguard: built tiny random Qwen3-VL ({n_params / 1e6:.2f}M params, seed {seed}) in {out}")
    return out


def resolve_model_class(name: str) -> type:
    """The transformers class called `name`; a clear error for names a release removed or never had."""
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    is_model = isinstance(cls, type) and (
        issubclass(cls, transformers.PreTrainedModel) or hasattr(cls, "_model_mapping")  # Auto* classes
    )
    if not is_model:
        removed = name == "AutoModelForVision2Seq"
        hint = " (AutoModelForVision2Seq was removed in transformers 5)" if removed else ""
        raise ValueError(
            f"model.model_class: {name!r} is not a model class in transformers {transformers.__version__}"
            f"{hint}; use 'Qwen3VLForConditionalGeneration' or 'AutoModelForImageTextToText'"
        )
    return cls


def _torch_dtype(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{key}: {name!r} is not a torch dtype; use bfloat16, float16 or float32")
    return dtype


def resolve_dtype(name: str) -> torch.dtype | str:
    """Map the recipe's model.dtype to what from_pretrained takes.

    `auto` keeps the checkpoint's dtype on GPU but loads float32 on CPU: bf16 matmuls on a 2-core CPU
    are several times slower than fp32, and fp16 on CPU is slower still.
    """
    if name == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32
    return _torch_dtype(name, "model.dtype")


def _ensure_model(model: Any) -> str:
    """Build the tiny random model at name_or_path first when the recipe asks for one (model.tiny)
    and no checkpoint is there yet; `seed` inside model.tiny picks the weights (default 0)."""
    tiny = getattr(model, "tiny", None)
    if tiny is not None and not (Path(model.name_or_path) / "config.json").is_file():
        overrides = dict(tiny)
        seed = overrides.pop("seed", 0)
        build_tiny_model(
            model.name_or_path, seed=seed, overrides=overrides,
            min_pixels=getattr(model, "min_pixels", None), max_pixels=getattr(model, "max_pixels", None),
        )
    return model.name_or_path


def _bnb_config(quantization: Any) -> Any:
    """4-bit config; skip_modules REPLACES transformers' default list, so it must name lm_head too."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=_torch_dtype(quantization.compute_dtype, "quantization.compute_dtype"),
        llm_int8_skip_modules=list(quantization.skip_modules),
    )


def _load_kwargs(model: Any, quantization: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(model.dtype)}
    if getattr(model, "attn_implementation", None):
        kwargs["attn_implementation"] = model.attn_implementation
    if quantization is not None and quantization.load_in_4bit:
        kwargs["quantization_config"] = _bnb_config(quantization)
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    return kwargs


def _lora_config(lora: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, bias=lora.bias, task_type="CAUSAL_LM",
    )


def load_processor(model: Any) -> Any:
    """AutoProcessor from name_or_path, with the recipe's pixel limits when it sets them.

    The limits are set on the image processor after loading: passed to from_pretrained they would also
    ride along on every call, which transformers 5 warns is deprecated.
    """
    from transformers import AutoProcessor
    from transformers.image_utils import SizeDict

    processor = AutoProcessor.from_pretrained(model.name_or_path)
    size = processor.image_processor.size
    min_pixels, max_pixels = getattr(model, "min_pixels", None), getattr(model, "max_pixels", None)
    processor.image_processor.size = SizeDict(
        shortest_edge=min_pixels or size.shortest_edge, longest_edge=max_pixels or size.longest_edge
    )
    return processor


def load_model(model: Any, lora: Any, quantization: Any) -> tuple[Any, Any]:
    """Load (model, processor) from the recipe's model/lora/quantization sections (duck-typed).

    Order matters: quantize while loading, then prepare_model_for_kbit_training (casts norms and
    embeddings to fp32), then wrap with LoRA. Gradient checkpointing is left to the training args.
    dtype "auto" gives float32 on CPU (bf16 training on a 2-core CPU is several times slower).
    """
    cls = resolve_model_class(getattr(model, "model_class", "Qwen3VLForConditionalGeneration"))
    path = _ensure_model(model)
    net = cls.from_pretrained(path, **_load_kwargs(model, quantization))
    if quantization is not None and quantization.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    if lora is not None and lora.enabled:
        from peft import get_peft_model

        net = get_peft_model(net, _lora_config(lora))
    return net, load_processor(model)
