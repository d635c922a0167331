"""stabguard.integrations.llamafactory: ``stabguard llamafactory train config.yaml``, tiny Qwen3-VL, CPU.

Runs in the tox env ``llamafactory`` (LLaMA-Factory's latest release beside stabguard); skipped where
LLaMA-Factory is not installed. A single process takes about a minute (LLaMA-Factory's start-up is most
of it); the multi-rank tests run the command as LLaMA-Factory's users launch several GPUs, on 2 CPU ranks
(gloo): under torchrun with ``deepspeed:`` naming the ZeRO-3 or ZeRO-2 config LLaMA-Factory ships, and
with ``FORCE_TORCHRUN=1`` (the command starts its own workers, as ``llamafactory-cli train`` does).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("llamafactory")

import yaml  # noqa: E402
from support_frameworks import (  # noqa: E402
    GUARDS, ON_RANK1, PLUGINS, RANK_INF_AT, RANK_NAN_AT, RANK_STEPS, STEPS, assert_both_ranks, assert_guarded,
    assert_loadable, assert_resumed_like, guard_state, mask_findings, rows, seam_present, with_image_tags,
)
from support_launch import MARKER, hang_limit, kill_marked, launch, launch_env  # noqa: E402

from stabguard.checkpoints import GUARD_STATE_FILE, MANIFEST_FILE  # noqa: E402
from stabguard.events import events_of_run, read_events  # noqa: E402
from stabguard.integrations import llamafactory as integration  # noqa: E402
from stabguard.seams import fsdp2_accelerate_problem  # noqa: E402

# LLaMA-Factory's examples/deepspeed/ds_z{2,3}_config.json (0.9.5), less their comms and monitor sections.
DEEPSPEED_HEAD = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                  "zero_allow_untested_optimizer": True,
                  "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                           "hysteresis": 2, "min_loss_scale": 1},
                  "bf16": {"enabled": "auto"}}
ZERO = {
    3: {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    2: {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8, "overlap_comm": False,
        "reduce_scatter": True, "reduce_bucket_size": 5e8, "contiguous_gradients": True, "round_robin_gradients": True},
}
SAVE_EVERY = 2  # the multi-rank runs' checkpoints: 2, 4, 6


def deepspeed_config(folder: Path, stage: int) -> Path:
    path = folder / f"ds_z{stage}_config.json"
    path.write_text(json.dumps({**DEEPSPEED_HEAD, "zero_optimization": ZERO[stage]}, indent=1))
    return path


def config(tmp_path: Path, assets, stabguard: dict | None, **training) -> Path:
    """The tiny boards as a sharegpt dataset with its dataset_info.json, and an SFT config for them."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "pcb.json").write_text(json.dumps([with_image_tags(assets, r) for r in rows(assets)]))
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    (data / "dataset_info.json").write_text(json.dumps({"pcb": {
        "file_name": "pcb.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": tags}}))
    cfg = {"model_name_or_path": str(assets["model"]), "image_max_pixels": 65536, "stage": "sft", "do_train": True,
           "finetuning_type": "lora", "lora_rank": 8, "lora_target": "q_proj,v_proj", "dataset_dir": str(data),
           "dataset": "pcb", "template": "qwen3_vl_nothink", "cutoff_len": 1024, "overwrite_cache": True,
           "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "output_dir": str(tmp_path / "out"),
           "logging_steps": 1, "save_strategy": "no", "plot_loss": False, "report_to": "none",
           "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
           "max_steps": STEPS, "lr_scheduler_type": "linear", "warmup_steps": 0, "bf16": False, "fp16": False,
           "seed": 0, **training}
    if stabguard is not None:
        cfg["stabguard"] = stabguard
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


STABGUARD = str(Path(sys.executable).with_name("stabguard"))


def command(tmp_path: Path, cfg: Path, *overrides: str, torchrun: bool = False, env: tuple[str, ...] = ()) -> list[str]:
    """``stabguard llamafactory train``; with ``torchrun``, on 2 ranks as LLaMA-Factory's users launch it."""
    ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else []
    return ["env", "CUDA_VISIBLE_DEVICES=", "HF_DATASETS_OFFLINE=1", f"HF_HOME={tmp_path / 'hf'}", *env, *ranks,
            STABGUARD, "llamafactory", "train", str(cfg), *overrides]


def stabguard_llamafactory(tmp_path: Path, cfg: Path, *overrides: str, check: bool = True, **how):
    return launch(command(tmp_path, cfg, *overrides, **how), what="stabguard llamafactory train", cwd=tmp_path,
                  check=check)


def killed_once(cmd: list[str], written: Path, *, cwd: Path) -> None:
    """Runs ``cmd`` until ``written`` exists, then SIGKILLs the launcher and every worker together (a node
    lost mid-run)."""
    marker, started = uuid.uuid4().hex, time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=launch_env(**{MARKER: marker}), cwd=cwd, text=True, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            while not written.exists():
                log.seek(0)
                assert proc.poll() is None, f"the run ended ({proc.returncode}) before {written}:\n{log.read()[-4000:]}"
                took = time.monotonic() - started
                assert took < hang_limit(), f"no {written} after {took:.0f} s"
                time.sleep(0.2)
        finally:
            kill_marked(marker)
            proc.wait()


def test_llamafactory_train_skips_a_nan_step_and_audits_llamafactory_s_labels(tmp_path, tiny_qwen_assets):
    cfg = config(tmp_path, tiny_qwen_assets, {"plugins": PLUGINS, "guards": GUARDS})
    stabguard_llamafactory(tmp_path, cfg)
    events = assert_guarded(tmp_path / "out", tmp_path / "out" / "adapter_model.safetensors")
    assert not mask_findings(events), "LLaMA-Factory's labels: the replies, each <|im_end|> and its newline"


def test_a_guard_stop_exits_3_and_the_same_command_resumes_from_its_checkpoint_with_the_guard_state(
        tmp_path, tiny_qwen_assets):
    """A STOP (an override sets nonfinite's max_consecutive to 2: NaN gradients at 2, then 4 and 5) exits 3
    with the last verified state in checkpoint-4. Run again, LLaMA-Factory resumes an output_dir that holds
    checkpoints from the highest number; stabguard takes the newest that verifies instead (not checkpoint-9,
    a save cut short), and the guards go on from their saved state."""
    guards = {"nonfinite": {}, "grad_norm": {}, "spike": {}, "faults": {"nan_grad_at": [2, 4, 5]}}
    cfg = config(tmp_path, tiny_qwen_assets, {"plugins": PLUGINS, "guards": guards}, max_steps=6, save_strategy="steps",
                 save_steps=6)
    done = stabguard_llamafactory(tmp_path, cfg, "stabguard.guards.nonfinite.max_consecutive=2", check=False)
    assert done.returncode == 3 and "stabguard: STOPPED at step 5" in done.stdout, done.stdout[-3000:]
    out = tmp_path / "out"
    stopped = guard_state(out / "checkpoint-4")
    assert stopped["stop_reason"].startswith("step 5") and stopped["skipped_steps"] == 2, f"checkpoint-4: {stopped}"
    (out / "checkpoint-9").mkdir()  # a save cut short: no manifest, no trainer_state.json
    stabguard_llamafactory(tmp_path, cfg)
    said = [e["message"] for e in events_of_run(read_events(out / "events.jsonl"))]
    assert f"resume: resuming from {out / 'checkpoint-4'} (the newest that verifies)" in said, said
    assert f"guard state restored from {out / 'checkpoint-4' / GUARD_STATE_FILE}" in said, said
    final = guard_state(out / "checkpoint-6")
    assert final["skipped_steps"] == 2 and final["stop_reason"] is None, f"the two skips counted still: {final}"
    assert [s for s, _ in final["recovery"]["rejected"]] == [2, 4, 5], "the recovery state's rejected steps came back"
    assert final["plugins"]["guard:spike"]["losses"][0][0] == 1, "the spike window holds step 1's loss still"


def test_bad_settings_are_refused_by_key_before_any_model_loads(tmp_path, tiny_qwen_assets):
    cfg = config(tmp_path, tiny_qwen_assets, {"guards": {"nosuch": {}}})
    done = stabguard_llamafactory(tmp_path, cfg, check=False)
    assert done.returncode == 2 and "stabguard.guards.nosuch: unknown guard; known guards:" in done.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("owner, name, why", integration.SEAMS)
def test_the_names_the_integration_relies_on_are_there(owner, name, why):
    version = importlib.import_module("llamafactory").__version__
    assert seam_present(owner, name), f"{owner}.{name} is gone from llamafactory {version} (used for: {why})"



def test_force_torchrun_starts_workers_that_run_stabguard_s_command(monkeypatch):
    """``llamafactory-cli train`` with ``FORCE_TORCHRUN=1`` (or several devices) starts its workers on its own
    launcher.py, which has no guarded step and refuses the ``stabguard:`` key ("Some keys are not used by the
    HfArgumentParser: ['stabguard']", measured); stabguard's command starts them on itself, with the same
    environment variables, and a worker trains."""
    from llamafactory.extras.misc import get_device_count

    for name in ("LOCAL_RANK", "NNODES", "NODE_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("MASTER_PORT", "29555")
    ours = ["stabguard", "llamafactory", "train", "config.yaml"]
    assert integration.torchrun_command(ours) == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", "29555", *ours]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert integration.torchrun_command(ours) is None, "a worker trains, it starts no workers"
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("FORCE_TORCHRUN")
    if get_device_count() <= 1:
        assert integration.torchrun_command(ours) is None, "one device or none: it trains in this process"

# ---- several ranks: LLaMA-Factory's DeepSpeed configs on 2 CPU ranks, rank 1 alone faulted ------------

def multi_rank_config(tmp_path: Path, assets, stage: int, **training) -> Path:
    return config(tmp_path, assets, {"plugins": PLUGINS, "guards": ON_RANK1}, max_steps=RANK_STEPS,
                  deepspeed=str(deepspeed_config(tmp_path, stage)), **training)


def assert_guarded_on_two_ranks(out: Path, assets) -> None:
    """Rank 1's NaN gradient and its Inf loss: each step skipped on both ranks with the LR held, the events
    of both ranks in one events.jsonl, the saved adapter finite and loadable onto the base model."""
    events = assert_guarded(out, out / "adapter_model.safetensors", skipped=(RANK_NAN_AT, RANK_INF_AT),
                            steps=RANK_STEPS)
    assert_both_ranks(events)
    assert_loadable(out, assets["model"])


def zero_files(checkpoint: Path) -> list[str]:
    return sorted(p.name for p in (checkpoint / f"global_step{RANK_STEPS}").iterdir())


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory, tiny_qwen_assets, deepspeed_comm_op) -> Path:
    """One uninterrupted ZeRO-3 run (checkpoints at 2, 4, 6): checked on its own, and the run a killed and
    resumed one must end like."""
    tmp = tmp_path_factory.mktemp("llamafactory-zero3")
    cfg = multi_rank_config(tmp, tiny_qwen_assets, 3, save_strategy="steps", save_steps=SAVE_EVERY)
    stabguard_llamafactory(tmp, cfg, torchrun=True)
    return tmp / "out"


def test_zero3_under_torchrun_skips_rank_1_s_faults_on_both_ranks(zero3_run, tiny_qwen_assets):
    """``torchrun --nproc-per-node 2 $(which stabguard) llamafactory train config.yaml`` with ``deepspeed:
    ds_z3_config.json``: the multi-GPU launch of LLaMA-Factory's docs, with stabguard's command."""
    assert_guarded_on_two_ranks(zero3_run, tiny_qwen_assets)
    assert zero_files(zero3_run / f"checkpoint-{RANK_STEPS}") == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")], \
        "ZeRO-3: each rank saved its own partition of the weights and of the optimizer state"


def test_zero2_started_by_force_torchrun_skips_rank_1_s_faults_on_both_ranks(tmp_path, tiny_qwen_assets,
                                                                             deepspeed_comm_op):
    """``FORCE_TORCHRUN=1 stabguard llamafactory train`` starts its workers as ``llamafactory-cli`` does
    (which would drop the guarded step); LLaMA-Factory's ds_z2_config.json has ``round_robin_gradients``,
    under which DeepSpeed 0.19 cannot gather one tensor's gradient unless stabguard links the partitions."""
    cfg = multi_rank_config(tmp_path, tiny_qwen_assets, 2, save_strategy="steps", save_steps=RANK_STEPS)
    done = stabguard_llamafactory(tmp_path, cfg, env=("FORCE_TORCHRUN=1", "NPROC_PER_NODE=2"))
    assert "[where: NaN/Inf gradients in language_model.layers.0.self_attn.q_proj" in done.stdout, \
        "the NaN step's where-note names the one faulted LoRA module, gathered from the round-robin partitions"
    assert_guarded_on_two_ranks(tmp_path / "out", tiny_qwen_assets)
    assert zero_files(tmp_path / "out" / f"checkpoint-{RANK_STEPS}") == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"], "ZeRO-2: whole weights, the optimizer state in 2 partitions"


def test_a_killed_zero3_run_resumed_with_resume_from_checkpoint_ends_like_the_uninterrupted_one(
        tmp_path, tiny_qwen_assets, zero3_run):
    """Every process SIGKILLed once checkpoint-2 is committed, then LLaMA-Factory's own resume option
    (``resume_from_checkpoint=<dir>``): the guards' counters, the spike window, the snapshot rule and the
    recovery state come back, and the run ends with the adapter the uninterrupted run ended with."""
    cfg = multi_rank_config(tmp_path, tiny_qwen_assets, 3, save_strategy="steps", save_steps=SAVE_EVERY)
    out = tmp_path / "out"
    killed_once(command(tmp_path, cfg, torchrun=True), out / f"checkpoint-{SAVE_EVERY}" / MANIFEST_FILE, cwd=tmp_path)
    assert not (out / "adapter_model.safetensors").exists(), "killed before the end"
    stabguard_llamafactory(tmp_path, cfg, f"resume_from_checkpoint={out / f'checkpoint-{SAVE_EVERY}'}", torchrun=True)
    resumed = events_of_run(read_events(out / "events.jsonl"))
    restored = [e["message"] for e in resumed if e["message"].startswith("guard state restored from")]
    assert restored and restored[0].endswith(f"checkpoint-{SAVE_EVERY}/{GUARD_STATE_FILE}"), restored
    assert [e["step"] for e in resumed if e["kind"] == "skip"] == [RANK_INF_AT], "rank 1's Inf loss, after the resume"
    final = f"checkpoint-{RANK_STEPS}"
    assert_resumed_like(zero3_run / final, out / final, resumed)


def test_fsdp2_is_refused_on_every_rank_under_llamafactory_s_accelerate(tmp_path, tiny_qwen_assets):
    """LLaMA-Factory takes FSDP2 as Trainer arguments (``fsdp``, ``fsdp_config``; ``accelerate launch`` with
    its fsdp2_config.yaml sets the same), but pins accelerate 1.11, which resumes a sharded checkpoint
    without its optimizer state: the guarded trainer refuses it on every rank before step 1. On CPU ranks,
    tests/cpu_fsdp lifts accelerate's gate (else it drops FSDP and trains data-parallel)."""
    problem = fsdp2_accelerate_problem()
    if problem is None:
        pytest.skip("accelerate >= 1.13 here: FSDP2 is not refused")
    fsdp = {"fsdp_version": 2, "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}
    cfg = config(tmp_path, tiny_qwen_assets, {"guards": {"nonfinite": {}}}, max_steps=1, fsdp="full_shard auto_wrap",
                 fsdp_config=fsdp)
    done = stabguard_llamafactory(tmp_path, cfg, torchrun=True, check=False,
                                  env=(f"PYTHONPATH={Path(__file__).parents[1] / 'cpu_fsdp'}",))
    assert done.returncode != 0 and done.stdout.count(f"stabguard: refused: {problem}") == 2, done.stdout[-3000:]
    assert not (tmp_path / "out" / "events.jsonl").exists() or not [
        e for e in read_events(tmp_path / "out" / "events.jsonl") if e["kind"] == "log"], "no step ran"


# ---- the probe: LLaMA-Factory builds everything, the guarded trainer probes its first step ----------------

def test_the_probe_finds_nan_pixels_in_llamafactory_s_first_step_and_trains_nothing(tmp_path, tiny_qwen_assets):
    """``stabguard llamafactory train config.yaml stabguard.probe=true``: the first step's forward and
    backward with its update vetoed, the report ``stabguard check --probe`` prints, exit 1 on an error
    finding; nothing lands in the run's output_dir."""
    guards = {"nonfinite": {}, "grad_norm": {}, "faults": {"nan_pixels_at": [1]}}
    cfg = config(tmp_path, tiny_qwen_assets, {"plugins": PLUGINS, "guards": guards})
    done = stabguard_llamafactory(tmp_path, cfg, "stabguard.probe=true", check=False)
    assert done.returncode == 1, f"an error finding exits 1, got {done.returncode}:\n{done.stdout[-3000:]}"
    report = done.stdout[done.stdout.index("stabguard check CustomSeq2SeqTrainer (probe of the framework's own run)"):]
    assert "ERROR  probe: gradients: 8 trainable tensors got NaN/Inf gradients" in report, report
    assert "ERROR  probe: activations: the first non-finite output is visual.patch_embed.proj's" in report, report
    assert not (tmp_path / "out").exists(), "the probe trains and saves nothing in the run's output_dir"


def test_the_shipped_zero3_config_uses_only_llamafactory_s_own_keys():
    """recipes/frameworks/llamafactory_pcb_qwen3vl_zero3.yaml: every key but ``stabguard`` is one of
    LLaMA-Factory's arguments (its parser refuses others: "Some keys are not used by the HfArgumentParser")."""
    import dataclasses

    from llamafactory import hparams

    config = yaml.safe_load((Path(__file__).parents[2] / "recipes" / "frameworks" /
                             "llamafactory_pcb_qwen3vl_zero3.yaml").read_text())
    known = {f.name for cls in (hparams.ModelArguments, hparams.DataArguments, hparams.TrainingArguments,
                                hparams.FinetuningArguments, hparams.GeneratingArguments)
             for f in dataclasses.fields(cls)}
    assert not set(config) - known - {"stabguard"}, f"not LLaMA-Factory's: {sorted(set(config) - known - {'stabguard'})}"
