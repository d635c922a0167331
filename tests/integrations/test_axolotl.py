"""stabguard.integrations.axolotl: ``axolotl train config.yml`` with the plugin, on the tiny Qwen3-VL, on CPU.

Runs in the tox env ``axolotl`` (Axolotl's latest release beside stabguard); skipped where Axolotl is not
installed. About a minute each: Axolotl's start-up is most of it.

The multi-rank runs are Axolotl's own command as its users launch several GPUs, ``axolotl train config.yml
--launcher torchrun -- --nproc_per_node 2``, on 2 CPU ranks (gloo) with DeepSpeed ZeRO-3 and ZeRO-2
(``deepspeed:`` naming Axolotl's own JSON files) and FSDP2 (``fsdp_version: 2``), rank 1 alone getting a NaN
gradient and an Inf loss; tests/cpu_axolotl makes Axolotl's GPU-only start-up run on CPU ranks (test-only,
its docstring says what and why). The ZeRO-3 run saves checkpoints and is the reference of a run killed
and resumed through Axolotl's ``auto_resume_from_checkpoints``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("axolotl")

import yaml  # noqa: E402
from support_frameworks import (  # noqa: E402
    GUARDS, NAN_AT, ON_RANK1, PLUGINS, RANK_INF_AT, RANK_NAN_AT, RANK_STEPS, STEPS, assert_both_ranks, assert_guarded,
    assert_loadable, assert_resumed_like, guard_state, mask_findings, rows, seam_present, with_absolute_images,
    write_jsonl,
)
from support_launch import MARKER, hang_limit, kill_marked, launch, launch_env  # noqa: E402

from stabguard.checkpoints import MANIFEST_FILE  # noqa: E402
from stabguard.events import events_of_run, read_events  # noqa: E402
from stabguard.integrations import axolotl as integration  # noqa: E402


CPU_RANKS = Path(__file__).parent.parent / "cpu_axolotl"  # on PYTHONPATH of a multi-rank launch (test-only)
# Axolotl's deepspeed_configs/zero3.json and zero2.json, as `axolotl fetch deepspeed_configs` writes them;
# zero2.json without its optimizer offload here: DeepSpeed's cpu_adam takes minutes to build once per
# environment on 2 cores (tox -e engines runs ZeRO-2 with the offload).
FP16_AUTO = {"enabled": "auto", "auto_cast": False, "loss_scale": 0, "initial_scale_power": 32,
             "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
BATCH_AUTO = {"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
              "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False}
ZERO3 = {"zero_optimization": {
    "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 0,
    "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
    "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0, "stage3_gather_16bit_weights_on_model_save": True},
    "bf16": {"enabled": "auto"}, "fp16": FP16_AUTO, **BATCH_AUTO}
ZERO2 = {"zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True},
         "bf16": {"enabled": "auto"}, "fp16": FP16_AUTO, **BATCH_AUTO}
ON_RANK1_SETTINGS = {"plugins": PLUGINS, "guards": ON_RANK1}
STOP_EXIT = 1  # a guard's STOP exits 3; Axolotl's launchers (accelerate launch, torchrun) report any failure as 1


def config(tmp_path: Path, assets, stabguard: dict | None, chat_template: str = "qwen2_vl", **keys) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", [with_absolute_images(assets, r) for r in rows(assets)])
    cfg = {
        "base_model": str(assets["model"]), "processor_type": "AutoProcessor", "chat_template": chat_template,
        "skip_prepare_dataset": True, "remove_unused_columns": False, "sample_packing": False,
        "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template"}],
        "dataset_prepared_path": str(tmp_path / "prepared"), "val_set_size": 0, "sequence_len": 2048,
        "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": STEPS, "num_epochs": 2,
        "optimizer": "adamw_torch", "learning_rate": 1e-3, "lr_scheduler": "linear", "warmup_steps": 0,
        "max_grad_norm": 1.0, "bf16": False, "fp16": False, "tf32": False, "flash_attention": False,
        "gradient_checkpointing": False, "output_dir": str(tmp_path / "out"), "logging_steps": 1,
        "save_strategy": "no", "seed": 0,
        "plugins": ["stabguard.integrations.axolotl.StabguardPlugin"],
    }
    if stabguard is not None:
        cfg["stabguard"] = stabguard
    cfg.update(keys)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def deepspeed_json(tmp_path: Path, name: str, content: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(content, indent=2))
    return str(path)


def axolotl_command(tmp_path: Path, cfg: Path, ranks: int = 1) -> list[str]:
    """As a user runs it; `axolotl train` launches `accelerate` or `torchrun` by name, so the environment's
    bin is on PATH. Several ranks: torchrun, as Axolotl's docs launch several GPUs (``--standalone``: a free
    port, as other launches may run beside this one)."""
    bin_dir = str(Path(sys.executable).parent)
    env_path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    cmd = ["env", f"PATH={env_path}", "AXOLOTL_DO_NOT_TRACK=1", "DO_NOT_TRACK=1", "WANDB_MODE=disabled",
           "HF_DATASETS_OFFLINE=1", f"HF_HOME={tmp_path / 'hf'}"]
    if ranks > 1:
        cmd += [f"PYTHONPATH={CPU_RANKS}", str(Path(bin_dir) / "axolotl"), "train", str(cfg), "--launcher", "torchrun",
                "--", "--nproc_per_node", str(ranks), "--standalone"]
    else:
        cmd += [str(Path(bin_dir) / "axolotl"), "train", str(cfg)]
    return cmd


def axolotl_train(tmp_path: Path, cfg: Path, check: bool = True, ranks: int = 1):
    started = time.monotonic()
    done = launch(axolotl_command(tmp_path, cfg, ranks), what=f"axolotl train with the stabguard plugin on {ranks} "
                  f"rank(s)", cwd=tmp_path, check=check)
    print(f"axolotl train, {ranks} rank(s), {cfg.parent.name}: {time.monotonic() - started:.0f} s")
    return done


def killed_once_committed(tmp_path: Path, cfg: Path, checkpoint: Path, ranks: int = 2) -> None:
    """The launch SIGKILLed (torchrun and every worker) as soon as ``checkpoint`` is committed (its manifest
    written): what a node failure or an out-of-memory kill leaves."""
    marker = uuid.uuid4().hex
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(axolotl_command(tmp_path, cfg, ranks), env=launch_env(**{MARKER: marker}),
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + hang_limit()
        try:
            while not (checkpoint / MANIFEST_FILE).exists():
                ended = proc.poll() is not None or time.monotonic() > deadline
                if ended:
                    log.seek(0)
                    raise AssertionError(f"{checkpoint.name} was not committed; the run:\n{log.read()[-4000:]}")
                time.sleep(0.5)
        finally:
            kill_marked(marker)
            proc.wait()


def checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob("checkpoint-*"))


def test_axolotl_train_skips_a_nan_step_and_audits_axolotl_s_labels(tmp_path, tiny_qwen_assets):
    cfg = config(tmp_path, tiny_qwen_assets, {"plugins": PLUGINS, "guards": GUARDS})
    done = axolotl_train(tmp_path, cfg)
    assert "StabguardAxolotlTrainer" in done.stdout or "stabguard" in done.stdout
    events = assert_guarded(tmp_path / "out", tmp_path / "out" / "adapter_model.safetensors")
    assert not mask_findings(events), "Axolotl's qwen2_vl labels are the assistant replies"


def test_axolotl_s_tokenizer_default_labels_are_caught_before_the_first_update(tmp_path, tiny_qwen_assets):
    """With the model's own template Axolotl has no role boundaries: it trains on the system and user turns
    and the vision markers. The mask guard names the sample and what is supervised, and no step runs."""
    cfg = config(tmp_path, tiny_qwen_assets, {}, chat_template="tokenizer_default")
    done = axolotl_train(tmp_path, cfg, check=False)
    assert done.returncode != 0 and "stabguard: STOPPED at step 1" in done.stdout, done.stdout[-3000:]
    findings = mask_findings(read_events(tmp_path / "out" / "events.jsonl"))
    assert findings and all("labels are not the assistant replies" in f for f in findings)
    assert any("<|vision_start|>" in f for f in findings), "the vision markers are named"


def test_a_bad_guard_option_fails_axolotl_s_config_validation(tmp_path, tiny_qwen_assets):
    cfg = config(tmp_path, tiny_qwen_assets, {"guards": {"nonfinite": {"max_consecutve": 3}}})
    done = axolotl_train(tmp_path, cfg, check=False)
    assert done.returncode != 0 and "stabguard.guards.nonfinite.max_consecutve" in done.stdout
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_stop_resumed_through_axolotl_s_resume_from_checkpoint_brings_the_guard_state_back(tmp_path,
                                                                                             tiny_qwen_assets):
    """nonfinite stops the run at the NaN step (max_consecutive 1), the last verified state in the STOP's
    checkpoint; Axolotl's launcher (accelerate launch) ends with the worker's failure. ``resume_from_checkpoint:
    <that checkpoint>`` (the fault gone) continues from it with the stopped run's guard state: its spike
    window, grad_norm statistics and the STOP's reason are what the resumed run starts from."""
    guards = {"nonfinite": {"max_consecutive": 1}, "grad_norm": {}, "spike": {}, "faults": {"nan_grad_at": [NAN_AT]}}
    out = tmp_path / "out"
    done = axolotl_train(tmp_path, config(tmp_path, tiny_qwen_assets, {"plugins": PLUGINS, "guards": guards}),
                         check=False)
    assert done.returncode == STOP_EXIT and f"stabguard: STOPPED at step {NAN_AT}" in done.stdout, done.stdout[-3000:]
    (stop,) = checkpoints(out)
    stopped = guard_state(out / stop)
    assert stop == f"checkpoint-{NAN_AT - 1}" and stopped["stop_reason"].startswith(f"step {NAN_AT}: "), stopped

    guards["faults"] = {}
    cfg = config(tmp_path, tiny_qwen_assets, {"plugins": PLUGINS, "guards": guards},
                 resume_from_checkpoint=str(out / stop), save_strategy="steps", save_steps=STEPS)
    axolotl_train(tmp_path, cfg)
    resumed = events_of_run(read_events(out / "events.jsonl"))
    assert f"guard state restored from {out / stop / 'stabguard_state.json'}" in [e["message"] for e in resumed]
    logged = [e["step"] for e in resumed if e["kind"] == "log"]
    assert logged == list(range(NAN_AT, STEPS + 1)), f"trained from the STOP's step on: {logged}"
    after = guard_state(out / f"checkpoint-{STEPS}")["plugins"]
    window = stopped["plugins"]["guard:spike"]["losses"]
    assert window and after["guard:spike"]["losses"][:len(window)] == window, "the spike window came back"
    counted = stopped["plugins"]["guard:grad_norm"]["alert"]["count"]
    assert after["guard:grad_norm"]["alert"]["count"] == counted + STEPS - NAN_AT + 1, "grad_norm's statistics too"


def test_the_probe_runs_axolotl_s_first_step_vetoed_reports_and_exits(tmp_path, tiny_qwen_assets):
    """``stabguard: {probe: true}``: ``axolotl train`` builds its model, LoRA, data and trainer as for training;
    the first step runs with its update vetoed, the probe's report is printed and the command exits, here
    failing on the NaN gradient it found. Nothing is trained or saved in the run's output folder."""
    settings = {"probe": True, "plugins": PLUGINS, "guards": {"nonfinite": {}, "faults": {"nan_grad_at": [1]}}}
    done = axolotl_train(tmp_path, config(tmp_path, tiny_qwen_assets, settings), check=False)
    assert done.returncode != 0, "an error finding fails the command"
    assert "AxolotlTrainer (probe of the framework's own run)" in done.stdout, done.stdout[-3000:]
    assert "ERROR  probe: gradients: 1 trainable tensors got NaN/Inf gradients" in done.stdout, done.stdout[-3000:]
    out = tmp_path / "out"
    assert not (out / "adapter_model.safetensors").exists() and not checkpoints(out), "nothing trained or saved"


# ---- several ranks: torchrun; DeepSpeed ZeRO-3, ZeRO-2, FSDP2; rank 1 alone gets the faults ----------------

def on_two_ranks(folder: Path, assets, **keys) -> Path:
    return config(folder, assets, ON_RANK1_SETTINGS, max_steps=RANK_STEPS, **keys)


def assert_rank1_faults_skipped(output_dir: Path, assets) -> None:
    """Rank 1's NaN gradient and Inf loss skipped on both ranks, the LR held, the adapter whole and finite
    (peft loads it), the decisions and rank 1's own findings in the one events.jsonl."""
    events = assert_guarded(output_dir, output_dir / "adapter_model.safetensors", skipped=(RANK_NAN_AT, RANK_INF_AT),
                            steps=RANK_STEPS)
    assert_both_ranks(events)
    assert_loadable(output_dir, assets["model"])


def zero3_keys(folder: Path) -> dict:
    return {"deepspeed": deepspeed_json(folder, "zero3.json", ZERO3), "save_strategy": "steps", "save_steps": 2}


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory, tiny_qwen_assets, deepspeed_comm_op) -> Path:
    """The ZeRO-3 run with rank 1's faults and a checkpoint every 2 steps: a test of its own, and the
    uninterrupted run the killed and resumed one must end like."""
    folder = tmp_path_factory.mktemp("axolotl-zero3")
    axolotl_train(folder, on_two_ranks(folder, tiny_qwen_assets, **zero3_keys(folder)), ranks=2)
    return folder


def test_zero3_on_two_ranks_skips_rank_1_s_faults_on_both(zero3_run, tiny_qwen_assets):
    """The Inf loss has finite gradients: only the ranks' agreement makes rank 0 skip it too."""
    out = zero3_run / "out"
    assert_rank1_faults_skipped(out, tiny_qwen_assets)
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    saved = sorted(p.name for p in (out / "checkpoint-6" / "global_step6").glob("zero_pp_rank_*_model_states.pt"))
    assert len(saved) == 2, f"ZeRO-3: each rank saved its own partition of the weights: {saved}"


def test_zero2_on_two_ranks_skips_rank_1_s_faults_on_both(tmp_path, tiny_qwen_assets, deepspeed_comm_op):
    """Axolotl puts a ZeRO-2 (or DDP) rank's model on CUDA device LOCAL_RANK (its config normalisation sets
    ``device_map: {"": LOCAL_RANK}`` whenever WORLD_SIZE > 1: "Found no NVIDIA driver" on CPU); with its
    ``max_memory`` key its loader computes the map instead: all on the CPU here."""
    cfg = on_two_ranks(tmp_path, tiny_qwen_assets, deepspeed=deepspeed_json(tmp_path, "zero2.json", ZERO2),
                       max_memory={"cpu": "16GiB"}, save_strategy="steps", save_steps=RANK_STEPS)
    axolotl_train(tmp_path, cfg, ranks=2)
    out = tmp_path / "out"
    assert_rank1_faults_skipped(out, tiny_qwen_assets)
    folder = out / f"checkpoint-{RANK_STEPS}" / f"global_step{RANK_STEPS}"
    saved = sorted(p.name for p in folder.iterdir())
    assert "mp_rank_00_model_states.pt" in saved and len([n for n in saved if n.endswith("_optim_states.pt")]) == 2, \
        f"ZeRO-2: the weights whole, the optimizer state partitioned over both ranks: {saved}"


def test_fsdp2_on_two_ranks_skips_rank_1_s_faults_on_both(tmp_path, tiny_qwen_assets):
    """``fsdp_version: 2``. Axolotl's LoRA kernels (on by default) compute q/k/v's LoRA in one autograd
    function, with no module call, and FSDP2 replaces the parameters: the test's fault would have nothing
    to hook, so ``lora_qkv_kernel: false`` (the guards need neither)."""
    fsdp = {"reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": "Qwen3VLTextDecoderLayer"}
    cfg = on_two_ranks(tmp_path, tiny_qwen_assets, fsdp_version=2, fsdp_config=fsdp, lora_qkv_kernel=False,
                       save_strategy="steps", save_steps=RANK_STEPS)
    axolotl_train(tmp_path, cfg, ranks=2)
    out = tmp_path / "out"
    assert_rank1_faults_skipped(out, tiny_qwen_assets)
    shards = sorted(p.name for p in (out / f"checkpoint-{RANK_STEPS}").rglob("*.distcp"))
    assert len(shards) >= 2 and {s.split("_")[2] for s in shards} >= {"0", "1"}, f"FSDP2: each rank's shards: {shards}"


def test_a_killed_zero3_run_resumed_by_axolotl_ends_as_the_uninterrupted_one(tmp_path, zero3_run, tiny_qwen_assets):
    """SIGKILL to torchrun and both workers once checkpoint-2 is committed, then Axolotl's own resume,
    ``auto_resume_from_checkpoints: true``: Axolotl names its highest-numbered folder, here one the kill
    left half-written, and the newest checkpoint that verifies is resumed instead. The guards' counters,
    the spike window, the snapshot and recovery state and the adapter at step 6 are those of the run never
    interrupted, and rank 1's Inf loss at step 4, after the resume, is skipped on both ranks."""
    out = tmp_path / "out"
    killed_once_committed(tmp_path, on_two_ranks(tmp_path, tiny_qwen_assets, **zero3_keys(tmp_path)),
                          out / "checkpoint-2")
    left = checkpoints(out)
    assert "checkpoint-6" not in left, f"killed before the end: {left}"
    torn = out / f"checkpoint-{int(left[-1].split('-')[1]) + 2}"  # what a kill in the middle of the next save leaves
    torn.mkdir()
    (torn / "trainer_state.json").write_text("{}")
    cfg = on_two_ranks(tmp_path, tiny_qwen_assets, auto_resume_from_checkpoints=True, **zero3_keys(tmp_path))
    axolotl_train(tmp_path, cfg, ranks=2)
    resumed = events_of_run(read_events(out / "events.jsonl"))
    assert_resumed_like(zero3_run / "out" / "checkpoint-6", out / "checkpoint-6", resumed)
    skips = [e["step"] for e in resumed if e["kind"] == "skip"]
    assert skips == [RANK_INF_AT] if left[-1] == "checkpoint-2" else not skips, f"the resumed run's skips: {skips}"
    assert_both_ranks(read_events(out / "events.jsonl"))


@pytest.mark.parametrize("owner, name, why", integration.SEAMS)
def test_the_names_the_integration_relies_on_are_there(owner, name, why):
    version = importlib.import_module("axolotl").__version__
    assert seam_present(owner, name), f"{owner}.{name} is gone from axolotl {version} (used for: {why})"
