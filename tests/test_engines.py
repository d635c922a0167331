"""The same faults, the same expectations, on every engine the guarded step runs on: a single device, DDP,
FSDP2 and DeepSpeed ZeRO-1/2/3 (with bf16 weights, two micro-batches per step, the optimizer offloaded).

Each engine runs tests/engine_worker.py's "faults" scenario for real on CPU ranks (gloo, torchrun): the
last rank alone gets a NaN gradient at step 2, a NaN loss at step 4 and a x50 loss spike at step 7. Every
rank must decide alike, change nothing on a skip, restore its own part of the verified state on the
rollback, hold the LR scheduler, and measure the norm of the whole gradients. About 20-60 s per engine.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch.distributed as dist
from support_launch import engine_run

from stabguard.seams import fsdp2_accelerate_problem

pytestmark = [pytest.mark.engines, pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and importlib.util.find_spec("torch.distributed.run")),
    reason="needs torch.distributed with the gloo backend and torchrun")]

ZERO = {"zero1": "DeepSpeedZeroOptimizer", "zero2": "DeepSpeedZeroOptimizer", "zero3": "DeepSpeedZeroOptimizer_Stage3"}
ENGINES = [("ddp", 1), ("ddp", 2), ("fsdp2", 2), ("zero1", 2), ("zero2", 2), ("zero3", 2), ("zero2-bf16", 2),
           ("zero3-bf16", 2), ("zero3-bf16-ga2", 2), ("zero2-bf16-offload", 2), ("zero2-roundrobin", 2)]


@pytest.mark.parametrize("engine, ranks", ENGINES, ids=["single" if n == 1 else e for e, n in ENGINES])
def test_faults_on_one_rank_are_decided_alike_and_leave_no_trace(request, tmp_path, tiny_assets, engine, ranks):
    kind = engine.split("-")[0]
    if kind == "fsdp2" and fsdp2_accelerate_problem():
        pytest.skip(fsdp2_accelerate_problem())
    if kind in ZERO:
        request.getfixturevalue("deepspeed_cpu_ops")
    reports = engine_run(tmp_path, engine, "faults", tiny_assets, nproc=ranks)
    first = reports[0]
    dropped = {s: v for s, v in first["verdicts"].items() if v != "PROCEED"}
    assert dropped == {"2": "SKIP", "4": "SKIP", "7": "ROLLBACK"}, "the last rank's NaN gradient, NaN loss, loss spike"
    for r in reports:
        assert r["ok"] and r["global_step"] == 8 and r["verdicts"] == first["verdicts"], "every rank decides alike"
        assert [(e[0], e[2]) for e in r["events"] if e[0] in ("skip", "rollback")] == [("skip", 2), ("skip", 4),
                                                                                       ("rollback", 7)]
        for step, norm in r["norms"].items():  # one measure on every rank: the norm of the whole gradients
            full = r["full_norms"][step]
            assert norm == first["norms"][step] or (math.isnan(norm) and math.isnan(first["norms"][step]))
            assert (not math.isfinite(norm)) if math.isnan(full) else norm == pytest.approx(full, rel=1e-4)
        d, lrs = r["digests"], r["lrs"]
        assert d["2"] == d["1"] and d["4"] == d["3"], "a skip changes no weight and no optimizer state"
        assert d["7"] == d["5"] != d["6"], "the rollback restores this rank's part of the step-5 state, bit for bit"
        assert lrs["3"] == lrs["2"] and lrs["5"] == lrs["4"] and lrs["8"] == lrs["7"], "a dropped step holds the LR"
    # Where step 2 broke: the NaN entered at the first LoRA B output, so the NaN/Inf gradients are that
    # module's (its lora_B and lora_A): the same answer on every rank, from the global per-tensor norms.
    said = {r["rank"]: next(e[3] for e in r["events"] if e[0] == "skip" and e[2] == 2) for r in reports}
    assert len(set(said.values())) == 1, f"the ranks disagree on where: {said}"
    assert "[where: NaN/Inf gradients in language_model.layers.0.self_attn.q_proj (2)" in said[0]
    if kind == "ddp":
        assert all(r["digests"] == first["digests"] for r in reports), "replicas stay bit-identical"
    else:
        assert first["digests"]["1"] != reports[-1]["digests"]["1"], "each rank holds its own shard or partition"
    if kind == "fsdp2":
        assert all(all(r["sharded"].values()) for r in reports), "the gradients were DTensors at every step"
    if kind in ZERO:
        for r in reports:
            assert r["deepspeed"] and r["zero"] == ZERO[kind], "the Trainer ran DeepSpeed's ZeRO optimizer"
            assert r["counters"]["8"] == {"global_steps": 8, "skipped_steps": 3}, "DeepSpeed counted its own skips"
            assert set(r["stale"].values()) == {0}, "the model reads the weights the optimizer holds"


def agreed(recovery: dict) -> dict:
    """The recovery state every rank must share: all but ``history``, each rank's own losses (a remedy reads
    the highest of every rank's, gathered when it is chosen)."""
    return {k: v for k, v in recovery.items() if k != "history"}


def test_a_rejected_step_is_replayed_on_every_rank_and_healed_alike(tmp_path, tiny_assets):
    """DDP, 2 ranks: each rank replays its own micro-batches; the evidence is gathered, so a transient on the
    last rank is a transient everywhere, and the sample that spikes on whichever rank trains it is
    quarantined, alone, on both; nothing else is."""
    reports = engine_run(tmp_path, "ddp", "heal", tiny_assets, nproc=2)
    first = reports[0]
    assert first["diagnoses"]["4"]["diagnosis"] == "transient"
    (quarantine,) = first["remedies"]
    assert quarantine["remedy"] == "quarantine" and quarantine["samples"][0].endswith("train.jsonl:3")
    for r in reports:
        assert r["ok"] and r["global_step"] == 9 and r["verdicts"] == first["verdicts"]
        assert agreed(r["recovery"]) == agreed(first["recovery"]), "one recovery state on every rank"
        assert list(r["recovery"]["quarantined"]) == quarantine["samples"]


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_a_healable_stop_on_one_rank_is_healed_alike_on_every_rank(request, tmp_path, tiny_assets, engine):
    """The last rank's loss spikes at steps 4, 6 and 8 (max_rollbacks 1) in training only: the STOPs at 6 and
    8 are a burst of the trajectory, healed by a cool-down on every rank alike, and no sample is blamed."""
    if engine in ZERO:
        request.getfixturevalue("deepspeed_cpu_ops")
    reports = engine_run(tmp_path, engine, "heal-sharded", tiny_assets, nproc=2)
    first = reports[0]
    dropped = {s: v for s, v in first["verdicts"].items() if v != "PROCEED"}
    assert dropped == {"4": "ROLLBACK", "6": "ROLLBACK", "8": "ROLLBACK"}
    expected = "unknown" if engine in ZERO else "transient"  # ZeRO-3: no rank can run a forward alone
    assert first["diagnoses"]["6"]["diagnosis"] == expected
    for r in reports:
        assert r["ok"] and r["global_step"] == 9 and r["verdicts"] == first["verdicts"]
        assert agreed(r["recovery"]) == agreed(first["recovery"]), "one recovery state on every rank"
        assert [s for s, _ in r["recovery"]["applied"]] == [6, 8] and not r["recovery"]["quarantined"]
        names = [x["remedy"] for x in r["remedies"]]
        assert set(names) <= {"cool_down", "reset_moments", "tighten_clip"} and len(set(names)) == 2, \
            "the trajectory's remedies, none chosen again after it did not help"
        d = r["digests"]
        assert d["4"] == d["2"] != d["3"] and d["6"] == d["4"] and d["8"] == d["6"], \
            "each healed STOP restored this rank's part of the verified state"


def test_a_divergence_is_rewound_alike_on_every_rank(tmp_path, tiny_assets):
    reports = engine_run(tmp_path, "ddp", "diverge", tiny_assets, nproc=2)
    first = reports[0]
    rewinds = [x for x in first["remedies"] if x["remedy"] == "rewind"]
    assert rewinds and rewinds[0]["restored_step"] < rewinds[0]["from_step"] - 1
    for r in reports:
        assert r["ok"] and r["verdicts"] == first["verdicts"] and r["remedies"] == first["remedies"]
        assert r["adapter_sums"] == first["adapter_sums"], "the same weights on every rank after the rewind"


def probe_reports(request, tmp_path, assets, engine, scenario) -> list[dict]:
    kind = engine.split("-")[0]
    if kind == "fsdp2" and fsdp2_accelerate_problem():
        pytest.skip(fsdp2_accelerate_problem())
    if kind in ZERO:
        request.getfixturevalue("deepspeed_cpu_ops")
    reports = engine_run(tmp_path, engine, scenario, assets, nproc=2)
    assert reports[1]["findings"] == reports[0]["findings"], "every rank reports the same"
    return reports[0]["findings"]


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_the_probe_runs_the_engines_step_on_every_rank(request, tmp_path, tiny_assets, engine):
    """``stabguard check --probe`` under torchrun: the run's own first step on each rank, through FSDP2 or
    ZeRO-2/3, the gradients from the engine's global per-tensor norms, the activations of every rank."""
    findings = {f["check"]: f for f in probe_reports(request, tmp_path, tiny_assets, engine, "probe")
                if f["guard"] == ""}
    cut = findings["probe: gradients"]  # layer 0's adapters, behind the cut (ZeRO: a zero partition, no arrival)
    assert cut["level"] == "error" and "got no gradient" in cut["message"], cut
    assert cut["details"] and all(d.startswith("language_model.layers.0.") for d in cut["details"]), cut["details"]
    overflow = findings["probe: activations"]  # the last rank's forward only
    assert overflow["message"].startswith("fp16 would overflow at language_model.layers.1.mlp.down_proj (max ")
    assert findings["probe: accumulation"]["level"] == "ok", "the ranks' mean loss is the token-weighted mean"
    assert findings["probe: pixels"]["level"] == "ok"
    assert findings["probe: step"]["values"]["ranks"] == 2
    assert findings["probe: stack"]["level"] == "ok"


def test_the_probe_finds_the_accumulation_off_by_batches_times_ranks(request, tmp_path, tiny_assets):
    findings = probe_reports(request, tmp_path, tiny_assets, "ddp", "probe-num-items")
    (acc,) = [f for f in findings if f["check"] == "probe: accumulation"]
    assert acc["level"] == "error" and "ignores num_items_in_batch" in acc["message"], acc
    assert acc["values"]["factor"] == pytest.approx(4, rel=0.25), "2 batches x 2 ranks"


@pytest.mark.parametrize("engine", ["fsdp2", "zero2"])
def test_a_real_run_names_adapters_no_gradient_reached_at_its_first_step(request, tmp_path, tiny_assets, engine):
    """The run's own check, free of any sync: ZeRO keeps no ``p.grad`` (a hook says what arrived), FSDP2 replaces
    the parameters (their ``p.grad`` stays None)."""
    kind = engine.split("-")[0]
    if kind == "fsdp2" and fsdp2_accelerate_problem():
        pytest.skip(fsdp2_accelerate_problem())
    if kind in ZERO:
        request.getfixturevalue("deepspeed_cpu_ops")
    for r in engine_run(tmp_path, engine, "cut", tiny_assets, nproc=2):
        assert r["ok"] and r["global_step"] == 2
        (finding,) = [e for e in r["events"] if e[0] == "finding"]
        assert finding[2] == 1 and "got no gradient at step 1, e.g. language_model.layers.0." in finding[3], finding
