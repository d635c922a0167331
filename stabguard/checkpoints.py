"""Checkpoints as commits: every file's size and hash in a manifest written last; verified before use.

A save writes its files (the Trainer's, every rank's shards, the guard state), then one process writes
``stabguard_manifest.json`` under a temporary name and renames it into place: the rename is the commit. A
folder without it is a save that did not finish, and no resume picks it. Resume checks every listed file's
size and hash, names what is damaged, and falls back to the newest checkpoint that verifies.

Checkpoints from before manifests (a guard state without ``"manifest": true``) still resume, with a warning:
only their files' formats can say whether they are whole (``stabguard.checkpoint_formats``). Hash: XXH3-128,
streamed: the standard library's BLAKE2b and SHA-256 made a save several times slower
(``bench/checkpoint_manifest.py``); bit rot and cut copies are what it must find, not tampering.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from stabguard.checkpoint_formats import format_problem
from stabguard.verdict import GuardError

MANIFEST_FILE = "stabguard_manifest.json"
GUARD_STATE_FILE = "stabguard_state.json"
PREFIX = "checkpoint-"
HASH = "xxh3_128"  # 3-14x the stdlib hashes' speed (bench/checkpoint_manifest.py); finds damage, not tampering
HASHES = {"xxh3_128": xxhash.xxh3_128, "blake2b": hashlib.blake2b, "sha256": hashlib.sha256}  # by manifest["hash"]
CHUNK = 1 << 22  # 4 MiB reads: the hash, not the calls, sets the pace


class CheckpointError(GuardError):
    """A checkpoint that cannot be used or written; ``exit_code`` is what ``stabguard run`` exits with."""

    exit_code = 1


class ResumeError(CheckpointError):
    """``--resume PATH`` names a checkpoint that does not verify (a bad argument, as a recipe error: exit 2)."""

    exit_code = 2


class SaveError(CheckpointError):
    """A save failed; the checkpoints written before it are untouched."""


@dataclass
class Verification:
    """What verifying one checkpoint folder found. ``status``: "verified" (every file as the manifest says),
    "legacy" (saved before manifests: usable, not checked), "trainer-only" (the Trainer's files without
    stabguard's: resumed only when named), "incomplete" (a save that did not finish), "damaged" (a file
    missing, or not the size or content the manifest says)."""

    folder: Path
    status: str
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.status in ("verified", "legacy")

    def describe(self) -> str:
        return f"{self.folder.name}: {'; '.join(self.problems) or self.status}"


# -- writing -----------------------------------------------------------------------------------------

def file_hash(path: Path, name: str = HASH) -> str:
    with open(path, "rb") as f:
        return stream_hash(f, name)


def stream_hash(f, name: str = HASH) -> str:
    """The hex digest of an open file, read in chunks (``hashlib.file_digest`` needs Python 3.11)."""
    digest = HASHES[name]()
    while chunk := f.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def listed_files(folder: Path, skip=()) -> list[Path]:
    """Every file under ``folder`` (shards in subfolders too, hidden ones: DCP's ``.metadata``) but the
    manifest and stabguard's own temporary files; ``skip``: top-level names left out."""
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] not in skip
            and p.name != MANIFEST_FILE and not (p.name.startswith(".stabguard") and p.name.endswith(".tmp"))]


def write_manifest(folder: str | Path, files: list[Path] | None = None, *, durable: bool = False) -> Path:
    """List ``files`` (default: every file of ``folder``) with size and hash, then commit: a temporary name,
    then a rename. ``durable``: every file and the rename reach the disk first, for when the previous
    checkpoint is deleted next (rotation). Otherwise a power cut may leave the manifest over cached data that
    never landed: resume finds it damaged and takes the checkpoint before, which is still there."""
    folder = Path(folder)
    files = listed_files(folder) if files is None else files
    entries = {p.relative_to(folder).as_posix(): _entry(p, durable) for p in files}
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": 1, "hash": HASH, "files": entries}, f, indent=1)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST_FILE)
    if durable:
        _fsync_dir(folder)
    return folder / MANIFEST_FILE


def _entry(path: Path, durable: bool) -> dict:
    with open(path, "rb") as f:
        digest = stream_hash(f)
        if durable:
            os.fsync(f.fileno())
        return {"size": os.fstat(f.fileno()).st_size, HASH: digest}


def stamps(output_dir: str | Path) -> dict[Path, tuple[int, int]]:
    """(mtime, size) of every file in a run folder but its checkpoints, event log and TensorBoard ``runs``:
    taken before and after the final save, to list what it wrote."""
    skip = [p.name for p in Path(output_dir).iterdir()
            if PREFIX in p.name or p.name == "runs" or p.name.startswith("events.jsonl")]
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in listed_files(Path(output_dir), skip)}


def written_since(output_dir: str | Path, before: dict[Path, tuple[int, int]]) -> list[Path]:
    """The files of the final save: new or changed since ``before``. The model card (README.md) is left out:
    frameworks rewrite it after the save."""
    return [p for p, stamp in stamps(output_dir).items() if before.get(p) != stamp and p.name != "README.md"]


def _fsync_dir(folder: Path) -> None:
    """Makes the rename itself durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_guard_state(state: dict) -> dict:
    """The guard state of a checkpoint that will have a manifest: without one, it was cut off mid-save."""
    return {**state, "manifest": True}


# -- verifying ---------------------------------------------------------------------------------------

def verify(folder: str | Path) -> Verification:
    """Check ``folder`` against its manifest: every listed file present, of its size, with its hash."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return _without_manifest(folder)
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))
        files, hash_name = listed["files"], listed["hash"]
        if hash_name not in HASHES:
            raise KeyError(f"unknown hash {hash_name!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Verification(folder, "damaged", [f"{MANIFEST_FILE} is unreadable ({type(exc).__name__}: {exc})"])
    problems = [p for name, entry in files.items() if (p := _file_problem(folder, name, entry, hash_name))]
    return Verification(folder, "damaged" if problems else "verified", problems)


def _file_problem(folder: Path, name: str, entry: dict, hash_name: str) -> str | None:
    path = folder / name
    try:
        size = path.stat().st_size
    except OSError:
        return f"{name} is missing"
    if size != entry["size"]:
        found, listed = human_size(size), human_size(entry["size"])
        if found == listed:  # a few bytes off a large file
            found, listed = f"{size} B", f"{entry['size']} B"
        return f"{name} is {found}, the manifest says {listed}"
    if file_hash(path, hash_name) != entry[hash_name]:
        return f"{name} has the manifest's size but not its content ({hash_name} differs)"
    return None


def _without_manifest(folder: Path) -> Verification:
    """No manifest: written before manifests existed (legacy), or a save that did not finish."""
    state = folder / GUARD_STATE_FILE
    if not (folder / "trainer_state.json").is_file():  # the Trainer writes it after weights and optimizer
        return Verification(folder, "incomplete", [f"no {MANIFEST_FILE} and no trainer_state.json: the save did "
                                                   "not finish"])
    if not state.is_file():
        return _by_format(folder, "trainer-only", f"no {MANIFEST_FILE} and no {GUARD_STATE_FILE}: written by the "
                          "Trainer alone (or cut off before stabguard's part), only its files' formats checked")
    try:
        marked = json.loads(state.read_text(encoding="utf-8")).get("manifest")
    except (OSError, ValueError, AttributeError):
        return Verification(folder, "damaged", [f"{GUARD_STATE_FILE} is unreadable and there is no {MANIFEST_FILE}"])
    if marked:
        return Verification(folder, "incomplete", [f"no {MANIFEST_FILE}: the save was cut off before its commit"])
    return _by_format(folder, "legacy", f"saved before manifests: no {MANIFEST_FILE}, only its files' formats checked")


def _by_format(folder: Path, status: str, caveat: str) -> Verification:
    """Without a manifest, the files' own formats still show a cut: a torn legacy checkpoint is damaged."""
    problems = [p for path in listed_files(folder) if (p := format_problem(path))]
    return Verification(folder, "damaged", problems) if problems else Verification(folder, status, [caveat])


def human_size(size: int) -> str:
    """Bytes as a person reads them; exact below 10 kB, where a cut of a few bytes must still show."""
    if size < 10_000:
        return f"{size} B"
    scaled, unit = next((size / 10**p, u) for p, u in ((9, "GB"), (6, "MB"), (3, "kB")) if size >= 10**p)
    return f"{scaled:.1f} {unit}"


# -- choosing ----------------------------------------------------------------------------------------

def step_of(folder: Path) -> int | None:
    step = folder.name.removeprefix(PREFIX)
    return int(step) if folder.name.startswith(PREFIX) and step.isdigit() else None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders of a run, newest (highest N) first."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX}*") if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def newest_usable(output_dir: str | Path) -> tuple[Verification | None, list[Verification]]:
    """The newest checkpoint that verifies (or is legacy), and the newer ones passed over on the way."""
    passed = []
    for folder in checkpoints(output_dir):
        found = verify(folder)
        if found.usable:
            return found, passed
        passed.append(found)
    return None, passed


def newest_committed(output_dir: str | Path) -> Path | None:
    """The newest checkpoint with a manifest (not re-hashed: named in messages, not loaded)."""
    return next((p for p in checkpoints(output_dir) if (p / MANIFEST_FILE).is_file()), None)


def expired(output_dir: str | Path, limit: int | None, keep=()) -> list[Path]:
    """``save_total_limit``: the checkpoints past ``limit``, oldest last, never one in ``keep`` (the one being
    committed, the best model's). Deleted only after the commit, so the newest verified one survives."""
    if not limit or limit <= 0:
        return []
    keep = {Path(p).resolve() for p in keep if p}
    return [p for p in checkpoints(output_dir)[limit:] if p.resolve() not in keep]


# -- resuming ----------------------------------------------------------------------------------------

def choose_resume(output_dir: Path, resume: str, option: str = "--resume") -> tuple[Path | None, list[str]]:
    """The checkpoint ``--resume`` names, verified, and what to say about it (passed-over ones, warnings).

    ``"last"``/``"auto"``: the newest that verifies (``"auto"``: None when there is none); a folder: that one,
    or :class:`ResumeError` naming what is wrong and the newest good one. ``option``: how the user asked
    (``--resume``, or a framework's ``resume_from_checkpoint``), as the messages name it."""
    if resume in ("last", "auto"):
        return _newest(Path(output_dir), resume, option)
    found = verify(resume)
    if found.usable or found.status == "trainer-only":
        return found.folder, [f"{found.describe()}; resuming anyway"] if found.status != "verified" else []
    if not found.folder.is_dir():
        found.problems = ["no such checkpoint folder"]
    good, _ = newest_usable(found.folder.parent)
    last = "--resume last" if option == "--resume" else f"{option}=true"
    instead = f"the newest good one is {good.folder} ({option} {good.folder}, or {last})" if good else (
        f"no checkpoint in {found.folder.parent} verifies")
    raise ResumeError(f"{_asked(option, resume)}: {found.describe()}; {instead}")


def _asked(option: str, resume: str) -> str:
    """``--resume last`` for stabguard run; ``resume_from_checkpoint=true`` for a framework's option."""
    if option == "--resume":
        return f"{option} {resume}"
    return f"{option}={'true' if resume == 'last' else resume}"


def _newest(output_dir: Path, resume: str, option: str = "--resume") -> tuple[Path | None, list[str]]:
    found, passed = newest_usable(output_dir)
    notes = [f"{v.describe()}; skipped" for v in passed]
    if found is None and resume == "auto":
        return None, notes + [f"--resume auto: no complete checkpoint in {output_dir} yet; starting fresh"]
    if found is None:
        raise CheckpointError(f"{_asked(option, resume)}: no complete checkpoint in {output_dir} (one whose "
                              f"{MANIFEST_FILE} verifies){': ' + '; '.join(v.describe() for v in passed) if passed else ''}")
    if found.status == "legacy":
        notes.append(f"{found.describe()}; resuming anyway")
    newest = " (the newest that verifies)" if passed else ""
    return found.folder, notes + [f"resuming from {found.folder}{newest}"]
