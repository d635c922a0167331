"""stabguard.integrations.ms_swift: ``swift sft ... --external_plugins <stabguard's file>``, tiny Qwen3-VL, CPU.

Runs in the tox env ``ms-swift`` (ms-swift's latest release beside stabguard); skipped where ms-swift is
not installed. One process: about a minute a run, ms-swift's start-up is most of it. Two CPU ranks
(``NPROC_PER_NODE=2 swift sft ...``: ms-swift starts torchrun itself) with ``--deepspeed zero3``,
``--deepspeed zero2`` and ``--fsdp fsdp2``, rank 1 alone faulty (``ON_RANK1``); the ZeRO-3 run is
killed and resumed with ``--resume_from_checkpoint``, and compared with one that was not.
"""

from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("swift")

from support_frameworks import (  # noqa: E402
    GUARDS, ON_RANK1, PLUGINS, RANK_INF_AT, RANK_NAN_AT, RANK_STEPS, STEPS, assert_both_ranks, assert_guarded,
    assert_loadable, assert_resumed_like, guard_state, mask_findings, rows, seam_present, with_image_tags,
    write_jsonl,
)
from support_launch import MARKER, hang_limit, kill_marked, launch, launch_env  # noqa: E402

from stabguard.events import read_events  # noqa: E402
from stabguard.integrations import ms_swift as integration  # noqa: E402

TESTS = Path(__file__).parents[1]
# On CPU ranks: use_cpu, else accelerate finds no backend for the ranks and each trains alone (DeepSpeed:
# "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 1 != 1 * 1 * 2");
# fp16 off, as ms-swift turns fp16 on for float32 weights and DeepSpeed refuses it on a CPU ("Type fp16 is
# not supported on your device."). A GPU run needs neither.
ON_CPU = ("--use_cpu", "true", "--fp16", "false")
# What each engine needs on CPU ranks beyond ON_CPU: a test-only patch of accelerate's CPU branch, doing
# what its accelerator branch does (tests/cpu_deepspeed, tests/cpu_fsdp; none for ZeRO-2).
ENGINES = {"zero3": (("--deepspeed", "zero3"), TESTS / "cpu_deepspeed"), "zero2": (("--deepspeed", "zero2"), None),
           "fsdp2": (("--fsdp", "fsdp2"), TESTS / "cpu_fsdp")}


def swift_command(tmp_path: Path, assets, env: dict[str, str], *extra, ranks: int = 1, steps: int = STEPS,
                  save_steps: int | None = None) -> list[str]:
    """``[NPROC_PER_NODE=2] swift sft ... --external_plugins <file> EXTRA``; output under tmp_path/out."""
    data = write_jsonl(tmp_path / "train.jsonl", [with_image_tags(assets, r) for r in rows(assets)])
    plugin = subprocess.run([sys.executable, "-m", "stabguard.integrations.ms_swift"], capture_output=True,
                            text=True, check=True).stdout.strip()  # as the documented flag prints it
    args = ["--model", assets["model"], "--model_type", "qwen3_vl", "--template", "qwen3_vl", "--use_hf", "true",
            "--dataset", data, "--split_dataset_ratio", "0", "--tuner_type", "lora", "--lora_rank", "8",
            "--lora_alpha", "16", "--target_modules", "all-linear", "--torch_dtype", "float32", "--attn_impl", "sdpa",
            "--max_length", "512", "--per_device_train_batch_size", "2" if ranks == 1 else "1",
            "--gradient_accumulation_steps", "1", "--max_steps", str(steps), "--learning_rate", "1e-3",
            "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--logging_steps", "1", "--save_strategy", "steps",
            "--save_steps", str(save_steps or steps), "--eval_strategy", "no", "--report_to", "none",
            "--dataloader_num_workers", "0", "--check_model", "false", "--seed", "0", "--output_dir", tmp_path / "out",
            "--external_plugins", plugin, *extra]
    if ranks > 1:
        env = {**env, "NPROC_PER_NODE": str(ranks), "MASTER_PORT": str(free_port())}
    return ["env", *(f"{k}={v}" for k, v in env.items()), "MODELSCOPE_OFFLINE=1", "HF_DATASETS_OFFLINE=1",
            "CUDA_VISIBLE_DEVICES=", f"MODELSCOPE_CACHE={tmp_path / 'ms'}", str(Path(sys.executable).with_name("swift")),
            "sft", *map(str, args)]


def swift_sft(tmp_path: Path, assets, env: dict[str, str], *extra, check: bool = True, **kwargs):
    cmd = swift_command(tmp_path, assets, env, *extra, **kwargs)
    return launch(cmd, what="swift sft with stabguard's external plugin", cwd=tmp_path, check=check)


def free_port() -> int:
    """torchrun's default port is shared by every launch on the machine; each launch gets a free one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_folder(tmp_path: Path, version: int = 0) -> Path:
    """ms-swift writes into a versioned folder under output_dir (v0-<time>; a resumed run: v1-<time>)."""
    (folder,) = (tmp_path / "out").glob(f"v{version}-*")
    return folder


def guard_env(guards: dict, engine: str | None = None) -> dict[str, str]:
    env = {"STABGUARD_GUARDS": json.dumps(guards), "STABGUARD_PLUGINS": ",".join(PLUGINS)}
    shim = ENGINES[engine][1] if engine else None
    return {**env, "PYTHONPATH": str(shim)} if shim else env


def two_ranks(tmp_path: Path, assets, engine: str, *extra, save_steps: int | None = None) -> Path:
    """``NPROC_PER_NODE=2 swift sft ... <engine's flags>`` with ON_RANK1's faults; returns its run folder."""
    started = time.monotonic()
    swift_sft(tmp_path, assets, guard_env(ON_RANK1, engine), *ENGINES[engine][0], *ON_CPU, *extra, ranks=2,
              steps=RANK_STEPS, save_steps=save_steps)
    print(f"\n{engine}, 2 ranks: {time.monotonic() - started:.0f} s", flush=True)
    return run_folder(tmp_path)


def test_swift_sft_skips_a_nan_step_and_audits_ms_swift_s_labels(tmp_path, tiny_qwen_assets):
    env = {"STABGUARD_GUARDS": json.dumps(GUARDS), "STABGUARD_PLUGINS": ",".join(PLUGINS)}
    swift_sft(tmp_path, tiny_qwen_assets, env)
    out = run_folder(tmp_path)
    events = assert_guarded(out, out / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    assert not mask_findings(events), "ms-swift's labels: the replies, each <|im_end|> and its newline"


def test_a_guard_stop_makes_swift_sft_exit_3_and_resume_from_checkpoint_brings_the_guard_state_back(
        tmp_path, tiny_qwen_assets):
    """Without stabguard a STOP would leave `swift sft` exiting 0, as if the run had trained. Resumed with
    ms-swift's own ``--resume_from_checkpoint`` from the STOP's checkpoint (the last verified state; the
    fault gone), the guard state comes back: the rejected step and the losses recorded before the STOP."""
    guards = {"nonfinite": {"max_consecutive": 1}, "spike": {}, "faults": {"nan_grad_at": [2]}}
    env = {"STABGUARD_GUARDS": json.dumps(guards), "STABGUARD_PLUGINS": ",".join(PLUGINS)}
    done = swift_sft(tmp_path, tiny_qwen_assets, env, check=False)
    assert done.returncode == 3, done.stdout[-3000:]
    assert "stabguard: STOPPED at step 2" in done.stdout
    (stopped,) = run_folder(tmp_path).glob("checkpoint-*")
    before = guard_state(stopped)["recovery"]
    assert [step for step, _ in before["rejected"]] == [2], f"the STOP's checkpoint records step 2: {before}"

    env["STABGUARD_GUARDS"] = json.dumps({k: v for k, v in guards.items() if k != "faults"})
    swift_sft(tmp_path, tiny_qwen_assets, env, "--resume_from_checkpoint", stopped)
    out = run_folder(tmp_path, version=1)
    events = read_events(out / "events.jsonl")
    assert any(e["message"] == f"guard state restored from {stopped}/stabguard_state.json" for e in events), \
        "the resumed run read the STOP's guard state"
    after = guard_state(out / f"checkpoint-{STEPS}")["recovery"]
    assert after["rejected"][:1] == before["rejected"] and after["history"]["1"] == before["history"]["1"], \
        f"the rejected step and step 1's loss from before the STOP came back: {after}"
    assert not [e for e in events if e["kind"] in ("skip", "stop")], "the resumed run trained every step"


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory, tiny_qwen_assets, deepspeed_comm_op) -> Path:
    """``NPROC_PER_NODE=2 swift sft ... --deepspeed zero3``, rank 1 faulty, a checkpoint every 2 steps: the
    ZeRO-3 test's run, and the uninterrupted run a resumed one is compared with."""
    return two_ranks(tmp_path_factory.mktemp("zero3"), tiny_qwen_assets, "zero3", save_steps=2)


def assert_rank1_faults_skipped(out: Path, adapter: Path) -> None:
    """Rank 1 alone got a NaN gradient and an Inf loss: both steps skipped (one decision, on both ranks),
    the LR held for each, the adapter finite; one events.jsonl with both ranks' lines."""
    events = assert_guarded(out, adapter, skipped=(RANK_NAN_AT, RANK_INF_AT), steps=RANK_STEPS)
    assert_both_ranks(events)


def test_zero3_on_two_ranks_skips_rank_1_s_faults_and_saves_a_loadable_adapter(zero3_run, tiny_qwen_assets):
    checkpoint = zero3_run / f"checkpoint-{RANK_STEPS}"
    assert_rank1_faults_skipped(zero3_run, checkpoint / "adapter_model.safetensors")
    assert_loadable(checkpoint, tiny_qwen_assets["model"])


def test_zero2_on_two_ranks_skips_rank_1_s_faults_and_saves_a_loadable_adapter(tmp_path, tiny_qwen_assets,
                                                                             deepspeed_comm_op):
    out = two_ranks(tmp_path, tiny_qwen_assets, "zero2")
    checkpoint = out / f"checkpoint-{RANK_STEPS}"
    assert_rank1_faults_skipped(out, checkpoint / "adapter_model.safetensors")
    assert_loadable(checkpoint, tiny_qwen_assets["model"])


def test_fsdp2_on_two_ranks_skips_rank_1_s_faults(tmp_path, tiny_qwen_assets):
    """ms-swift's fsdp2 preset saves sharded (SHARDED_STATE_DICT): its checkpoints hold the adapter only in
    pytorch_model_fsdp_0 (torch.distributed.checkpoint), which is read back here into peft's files."""
    out = two_ranks(tmp_path, tiny_qwen_assets, "fsdp2")
    adapter = adapter_from_sharded(out / f"checkpoint-{RANK_STEPS}" / "pytorch_model_fsdp_0", tmp_path / "adapter")
    assert_rank1_faults_skipped(out, adapter / "adapter_model.safetensors")
    assert_loadable(adapter, tiny_qwen_assets["model"])


def adapter_from_sharded(shards: Path, into: Path) -> Path:
    """An FSDP2 checkpoint's LoRA tensors, gathered from every rank's shards, as a peft adapter folder."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(shards, into.with_suffix(".pt"))
    weights = torch.load(into.with_suffix(".pt"))["model"]
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in weights})
    into.mkdir()
    save_file(weights, into / "adapter_model.safetensors")
    LoraConfig(r=8, lora_alpha=16, target_modules=modules).save_pretrained(into)
    return into


def test_a_killed_zero3_run_resumes_through_resume_from_checkpoint_as_if_never_stopped(
        tmp_path, tiny_qwen_assets, zero3_run):
    """The run of ``zero3_run``, killed (SIGKILL, launcher and workers) once checkpoint-2 is committed, then
    ``--resume_from_checkpoint <v0-...>/checkpoint-2``: it ends with the guard counters, spike window,
    snapshot and recovery state, and adapter of the run that was never interrupted; rank 1's Inf loss at
    step 4 comes after the resume and is skipped there."""
    engine_flags, shim = ENGINES["zero3"]
    env = guard_env(ON_RANK1, "zero3")
    cmd = swift_command(tmp_path, tiny_qwen_assets, env, *engine_flags, *ON_CPU, ranks=2, steps=RANK_STEPS,
                        save_steps=2)
    killed_at = kill_once(cmd, tmp_path / "out", "v0-*/checkpoint-2/stabguard_manifest.json", cwd=tmp_path)
    killed = run_folder(tmp_path)
    assert not (killed / f"checkpoint-{RANK_STEPS}").exists(), f"killed before it ended (at {killed_at})"

    started = time.monotonic()
    swift_sft(tmp_path, tiny_qwen_assets, env, *engine_flags, *ON_CPU, "--resume_from_checkpoint",
              killed / "checkpoint-2", ranks=2, steps=RANK_STEPS, save_steps=2)
    print(f"\nzero3 resumed from checkpoint-2: {time.monotonic() - started:.0f} s", flush=True)
    out = run_folder(tmp_path, version=1)
    events = read_events(out / "events.jsonl")
    assert [(e["step"], e["guard"]) for e in events if e["kind"] == "skip"] == [(RANK_INF_AT, "nonfinite")], \
        "the resumed run skips rank 1's Inf loss at step 4, and only it"
    assert_resumed_like(zero3_run / f"checkpoint-{RANK_STEPS}", out / f"checkpoint-{RANK_STEPS}", events)


def kill_once(cmd: list[str], out: Path, ready: str, *, cwd: Path) -> str:
    """Start ``cmd``; as soon as ``out`` holds a file matching ``ready``, SIGKILL it with every process it
    started (torchrun's workers too). Returns what had been written by then."""
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, env=launch_env(**{MARKER: marker}), cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + hang_limit()
    try:
        while not list(out.glob(ready)):
            assert proc.poll() is None, f"the run ended ({proc.returncode}) before {ready} was written"
            assert time.monotonic() < deadline, f"{ready} not written within {hang_limit():.0f} s"
            time.sleep(0.2)
    finally:
        kill_marked(marker)
        proc.wait()
    return ", ".join(sorted(p.name for p in out.glob("v0-*/checkpoint-*")))


def test_the_probe_runs_through_swift_sft_reports_and_trains_nothing(tmp_path, tiny_qwen_assets):
    """``STABGUARD_PROBE=1 swift sft ...``: ms-swift builds its trainer as for training, the guarded trainer
    runs its first step with the update vetoed, prints the probe's report and exits 1 on an error finding
    (here a NaN gradient); nothing is trained or saved in the run's folder."""
    env = {"STABGUARD_GUARDS": json.dumps({"nonfinite": {}, "faults": {"nan_grad_at": [1]}}),
           "STABGUARD_PLUGINS": ",".join(PLUGINS), "STABGUARD_PROBE": "1"}
    done = swift_sft(tmp_path, tiny_qwen_assets, env, check=False)
    assert done.returncode == 1, f"an error finding exits 1:\n{done.stdout[-3000:]}"
    assert "Seq2SeqTrainer (probe of the framework's own run)" in done.stdout, done.stdout[-3000:]
    assert "ERROR  probe: gradients:" in done.stdout and "NaN/Inf gradients" in done.stdout, done.stdout[-3000:]
    assert not list(run_folder(tmp_path).glob("checkpoint-*")), "the probe saves nothing in the run's folder"


@pytest.mark.parametrize("owner, name, why", integration.SEAMS)
def test_the_names_the_integration_relies_on_are_there(owner, name, why):
    version = importlib.import_module("swift").__version__
    assert seam_present(owner, name), f"{owner}.{name} is gone from swift {version} (used for: {why})"


def test_the_shipped_zero3_command_uses_only_swift_sft_s_own_flags():
    """recipes/frameworks/ms_swift_pcb_qwen3vl_zero3.sh: every flag is one of ``swift sft``'s arguments."""
    import dataclasses
    import re

    from swift.arguments import SftArguments

    script = (Path(__file__).parents[2] / "recipes" / "frameworks" / "ms_swift_pcb_qwen3vl_zero3.sh").read_text()
    command = script[script.index("swift sft"):]
    flags = set(re.findall(r"--(\w+)", command))
    known = {f.name for f in dataclasses.fields(SftArguments)}
    assert flags and not flags - known, f"not swift sft's: {sorted(flags - known)}"
