"""Fixtures shared across the suite.

Tests never autoload third-party plugins (the entry-point switch is set here); a test that needs
entry points turns it back on with monkeypatch.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

os.environ["STABGUARD_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed compiles its CPU ops on first use. In the shared ~/.cache/torch_extensions, test runs in two
# environments rebuilt each other's builds (minutes each); each environment gets a folder of its own.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(
    Path.home() / ".cache" / "stabguard-tests" / "torch_extensions" / hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]))


def pytest_report_header(config):
    """How long the run takes, when it is one of the suites (not a few files picked by hand)."""
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        return []
    selected = config.getoption("markexpr") or ""
    if "engines" in selected and "not engines" not in selected:
        return ["stabguard: the engine tests (DeepSpeed ZeRO-1/2/3, FSDP2, DDP under torchrun, 2 CPU ranks each): "
                "about 15 min on 2 cores, plus 2-5 min once per environment to build DeepSpeed's CPU ops"]
    return ["stabguard: the default suite, about 5 min on 2 idle cores (more under load); the engine tests "
            "(DeepSpeed, FSDP2, torchrun) are deselected here: tox -e engines, or pytest -m engines"]


# ---- core: the tiny demo model and synthetic data, built once per session --------------------------

def pytest_configure(config):
    """The public fixtures (``stabguard_tiny_assets``, ``run_guard``) come from the ``pytest11`` entry
    point once stabguard is installed; from a source checkout that was not reinstalled, load them here."""
    if not config.pluginmanager.has_plugin("stabguard.testing.pytest_plugin") and not any(
            getattr(p, "__name__", "") == "stabguard.testing.pytest_plugin" for p in config.pluginmanager.get_plugins()):
        config.pluginmanager.import_plugin("stabguard.testing.pytest_plugin")


@pytest.fixture(scope="session")
def tiny_qwen_assets(tmp_path_factory):
    """The tiny model with the real Qwen vocabulary and token ids (frameworks hard-code some), and its data."""
    pytest.importorskip("dashscope")
    from stabguard.testing import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("tiny-qwen"), tokenizer="qwen")


@pytest.fixture(scope="session")
def tiny_assets(stabguard_tiny_assets):
    """A saved tiny random Qwen3-VL (with processor) and a small synthetic PCB train set (built once)."""
    return stabguard_tiny_assets


# ---- collate/mask (helper): tokenizers and processors, built once per session ----------------------
# Fixture names start with the tokenizer they use; the Qwen BPE ones skip when dashscope is missing.

@pytest.fixture(scope="session")
def demo_tokenizer():
    """The small demo byte-level BPE with Qwen's special tokens (no unk token, like Qwen)."""
    from stabguard.qwen import build_demo_tokenizer

    return build_demo_tokenizer()


@pytest.fixture(scope="session")
def demo_processor(demo_tokenizer):
    """A Qwen3-VL processor on the demo tokenizer; 4 to 16 tokens per image keeps tests fast."""
    from stabguard.qwen import build_processor

    return build_processor(demo_tokenizer, min_pixels=4 * 32 * 32, max_pixels=16 * 32 * 32)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen BPE (dashscope's qwen.tiktoken) with the special tokens at their real ids."""
    pytest.importorskip("dashscope")
    from stabguard.qwen import build_qwen_tokenizer

    return build_qwen_tokenizer()


@pytest.fixture(scope="session")
def qwen_processor(qwen_tokenizer):
    """A Qwen3-VL processor on the real Qwen BPE; small image limits as for ``demo_processor``."""
    from stabguard.qwen import build_processor

    return build_processor(qwen_tokenizer, min_pixels=4 * 32 * 32, max_pixels=16 * 32 * 32)


# ---- engines: DeepSpeed's CPU ops, built once per environment before any DeepSpeed launch --------------

BUILD_DEEPSPEED_OPS = """
import sys
import deepspeed
from deepspeed.accelerator import get_accelerator
for name in sys.argv[1:]:
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load()
"""


def build_deepspeed_ops(request, *builders: str) -> None:
    """Built here once per environment, with a message, rather than inside a launch and its time limit."""
    import importlib.util

    from support_launch import launch

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\nstabguard tests: DeepSpeed's CPU ops {', '.join(builders)} in {os.environ['TORCH_EXTENSIONS_DIR']} "
              "(built on first use: 1-5 min on 2 cores, once per environment)", flush=True)
    launch([sys.executable, "-c", BUILD_DEEPSPEED_OPS, *builders], limit_s=1800,
           what=f"building DeepSpeed's CPU ops ({', '.join(builders)})")


@pytest.fixture(scope="session")
def deepspeed_comm_op(request):
    """The shared-memory collective every DeepSpeed launch on CPU loads (85 s of compiler time alone)."""
    build_deepspeed_ops(request, "ShareMemCommBuilder")


@pytest.fixture(scope="session")
def deepspeed_cpu_ops(request, deepspeed_comm_op):
    """The collective and cpu_adam (optimizer offload; about 2x the collective's build)."""
    build_deepspeed_ops(request, "CPUAdamBuilder")
