"""stabguard/checkpoints.py: the manifest as a checkpoint's commit, verification naming the damaged file, and
the choice of the newest checkpoint that verifies. Faults are made for real: files cut, deleted, rewritten."""

from __future__ import annotations

import json

from stabguard.checkpoints import (
    GUARD_STATE_FILE,
    MANIFEST_FILE,
    checkpoints,
    expired,
    human_size,
    mark_guard_state,
    newest_usable,
    stamps,
    verify,
    write_manifest,
    written_since,
)


def fake_checkpoint(folder, *, manifest=True, optimizer_bytes=4_200_000, marked=True):
    """A checkpoint as stabguard saves one: weights, optimizer, a shard in a subfolder, the two state files
    (the weights and optimizer bytes in no format the legacy check judges: the manifest is under test)."""
    folder.mkdir(parents=True)
    (folder / "adapter_model.bin").write_bytes(b"w" * 3000)
    (folder / "optimizer.pt").write_bytes(bytes(range(256)) * (optimizer_bytes // 256))
    (folder / "pytorch_model_fsdp_0").mkdir()
    (folder / "pytorch_model_fsdp_0" / "__1_0.distcp").write_bytes(b"rank one" * 100)
    (folder / "trainer_state.json").write_text("{}")
    state = {"skipped_steps": 0}
    (folder / GUARD_STATE_FILE).write_text(json.dumps(mark_guard_state(state) if marked else state))
    if manifest:
        write_manifest(folder)
    return folder


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    folder = fake_checkpoint(tmp_path / "checkpoint-4")
    files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    assert set(files) == {"adapter_model.bin", "optimizer.pt", "pytorch_model_fsdp_0/__1_0.distcp",
                          "trainer_state.json", GUARD_STATE_FILE}
    assert files["optimizer.pt"]["size"] == (folder / "optimizer.pt").stat().st_size
    assert not list(folder.glob(".*")), "the temporary name was renamed away"
    assert verify(folder).status == "verified"


def test_a_torn_file_is_named_with_its_size_and_the_manifests(tmp_path):
    folder = fake_checkpoint(tmp_path / "checkpoint-12")
    with open(folder / "optimizer.pt", "r+b") as f:
        f.truncate(2_100_000)
    found = verify(folder)
    assert found.status == "damaged" and not found.usable
    assert found.describe() == "checkpoint-12: optimizer.pt is 2.1 MB, the manifest says 4.2 MB"


def test_a_missing_file_and_a_rewritten_one_are_named(tmp_path):
    folder = fake_checkpoint(tmp_path / "checkpoint-8")
    (folder / "pytorch_model_fsdp_0" / "__1_0.distcp").unlink()
    (folder / "adapter_model.bin").write_bytes(b"x" * 3000)  # same size, other bytes (bit rot)
    problems = verify(folder).problems
    assert "pytorch_model_fsdp_0/__1_0.distcp is missing" in problems
    assert "adapter_model.bin has the manifest's size but not its content (xxh3_128 differs)" in problems


def test_a_few_bytes_off_a_large_file_show_in_bytes():
    assert human_size(4_200_000) == "4.2 MB" and human_size(812) == "812 B"


def test_without_manifest_legacy_resumes_and_a_cut_off_save_does_not(tmp_path):
    legacy = fake_checkpoint(tmp_path / "checkpoint-2", manifest=False, marked=False)
    cut = fake_checkpoint(tmp_path / "checkpoint-4", manifest=False)  # killed between guard state and commit
    bare = tmp_path / "checkpoint-6"
    bare.mkdir()
    (bare / "optimizer.pt").write_bytes(b"half")
    assert verify(legacy).status == "legacy" and verify(legacy).usable
    assert verify(cut).status == "incomplete" and "cut off before its commit" in verify(cut).describe()
    assert verify(bare).status == "incomplete"


def test_an_unreadable_manifest_is_damage(tmp_path):
    folder = fake_checkpoint(tmp_path / "checkpoint-3")
    (folder / MANIFEST_FILE).write_text('{"files": {')
    assert verify(folder).status == "damaged" and MANIFEST_FILE in verify(folder).describe()


def test_newest_usable_falls_back_past_damaged_and_incomplete_ones(tmp_path):
    for step in (4, 8, 12):
        fake_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-12" / "optimizer.pt").write_bytes(b"")
    fake_checkpoint(tmp_path / "checkpoint-16", manifest=False)
    (tmp_path / "unverified-checkpoint-20").mkdir()  # a STOP's set-aside state is never a candidate
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-16", "checkpoint-12", "checkpoint-8", "checkpoint-4"]
    found, passed = newest_usable(tmp_path)
    assert found.folder.name == "checkpoint-8"
    assert [v.describe() for v in passed] == [
        f"checkpoint-16: no {MANIFEST_FILE}: the save was cut off before its commit",
        "checkpoint-12: optimizer.pt is 0 B, the manifest says 4.2 MB"]


def test_the_final_saves_manifest_lists_what_it_wrote_not_the_checkpoints_or_the_model_card(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-4")
    (tmp_path / "trainer_state.json").write_text("{}")  # saved before: not the final save's
    (tmp_path / "events.jsonl").write_text("")
    before = stamps(tmp_path)
    assert set(before) == {tmp_path / "trainer_state.json"}, "checkpoints and the event log are not in it"
    for name in ("adapter_model.safetensors", "README.md"):
        (tmp_path / name).write_bytes(b"final")
    write_manifest(tmp_path, written_since(tmp_path, before))
    assert set(json.loads((tmp_path / MANIFEST_FILE).read_text())["files"]) == {"adapter_model.safetensors"}
    (tmp_path / "README.md").write_text("the model card a framework writes afterwards")
    assert verify(tmp_path).status == "verified"


def test_expired_keeps_the_limit_the_one_being_committed_and_the_best(tmp_path):
    for step in (2, 4, 6, 8, 99):
        (tmp_path / f"checkpoint-{step}").mkdir()
    committed, best = tmp_path / "checkpoint-8", tmp_path / "checkpoint-2"
    assert [p.name for p in expired(tmp_path, 2, keep=(committed, best))] == ["checkpoint-6", "checkpoint-4"]
    assert [p.name for p in expired(tmp_path, 1, keep=(committed,))] == ["checkpoint-6", "checkpoint-4",
                                                                         "checkpoint-2"], "a stale 99 never outlives the new one"
    assert expired(tmp_path, None) == expired(tmp_path, 0) == []
