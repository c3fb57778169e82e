"""The export manifest (``manifest.json`` of ``OUT/<model>-<fingerprint>/``): written, read and validated here.

Schema ``keyedge-artifact/2`` (``docs/artifact.schema.json``): version 2 added ``posture`` (what the set answers
and how, :mod:`keyedge.postures`); version 1 manifests (no posture: scores, no guard) read the same.
:meth:`ArtifactManifest.read` checks every field a reader uses -- types, ranges, that file paths stay inside the
directory, that targets are known -- and raises one :class:`~keyedge.validate.ManifestError`
naming the file and the field otherwise.  Manifests written before the ``schema`` field
(``"format": "keyedge-artifacts", "version": 1``) read the same.  The key itself is never
in a manifest: only its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyedge.defenses import defense_record, get_defense
from keyedge.deploy.parity import Parity, VerificationError
from keyedge.exporters import get_backend, list_backends
from keyedge.fileio import sha256_file
from keyedge.keys.seal import CIPHER, SEALED_FORMAT, SEALED_SUFFIX
from keyedge.postures import SCORES, Posture, PostureError
from keyedge.validate import FINGERPRINT, MAX_CLASSES, MAX_IMAGE_SIZE, SHA256, Fields, ManifestError, read_json

MANIFEST = "manifest.json"
#: keyedge.exporters.base.PRECISIONS (the deploy layer reads, never imports it)
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "dynamic-int8", "int4")
#: precisions verified by the agreement rule (top-1 agreement with fp32 and the accuracy drop), not by tolerance
AGREEMENT_PRECISIONS = ("bf16", "int8", "dynamic-int8", "int4")
FORMAT = "keyedge-artifacts"  # the pre-schema spelling
SCHEMA = "keyedge-artifact/2"
HINT = "the artifact directory is corrupted or was hand-edited; export it again"
MAX_BATCH = 1 << 16
FUSES = ("gather", "elements", "fold", "conv", "planes", "none")


@dataclass
class TargetRecord:
    """One target's artifact: its files (paths relative to the directory), graph, interface and parity.

    ``parity`` is typed (:class:`~keyedge.deploy.parity.Parity`); a plain dict (its JSON) is read into one.
    """

    fuse: str
    files: list[dict[str, str]]  # {"path", "sha256"}
    graph: dict[str, Any] = field(default_factory=dict)
    io: dict[str, Any] = field(default_factory=dict)
    source: str = "full-export"
    parity: Parity = field(default_factory=Parity)
    #: how ``--fuse auto|fastest`` chose this target's form (:mod:`keyedge.deploy.forms`); None for an explicit one
    form_choice: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.parity, Parity):
            self.parity = Parity.from_dict(self.parity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fuse": self.fuse,
            "files": self.files,
            "graph": self.graph,
            "io": self.io,
            "source": self.source,
            "parity": self.parity.to_dict(),
        } | ({"form_choice": self.form_choice} if self.form_choice is not None else {})


@dataclass
class ArtifactManifest:
    """What an export directory holds, for which key (by fingerprint) and how it was verified."""

    model: dict[str, Any]  # name, family, num_classes, classes, weights
    fingerprint: str | None
    block_size: int | None
    fuse: str
    precision: str
    input: dict[str, Any]  # name, shape [B or -1, 3, S, S], dtype, layout, range, channels
    output: dict[str, Any]
    targets: dict[str, TargetRecord]
    checkpoint: dict[str, Any] = field(default_factory=dict)  # path, manifest_sha256, epoch, test_accuracy
    defense: dict[str, Any] | None = None
    finetune: str = "full"
    lora_merged: bool = False
    fuse_requested: str | None = None
    fuse_note: str | None = None
    key_note: str | None = None
    normalization: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    #: sealed sets (``keyedge export --seal``): format, cipher, the sealing key's fingerprint, a random set id
    seal: dict[str, Any] | None = None
    #: the posture's record (:meth:`keyedge.postures.Posture.to_dict`); None: written before postures (scores)
    posture: dict[str, Any] | None = None
    directory: Path | None = field(default=None, compare=False)  # where it was read from (not written)
    raw: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # the JSON as read

    # ---- sealing ------------------------------------------------------------------------------------------------
    def binding(self) -> bytes:
        """The digest a sealed set's files are bound to (docs/sealed-format.md).

        SHA-256 of the manifest's canonical JSON (sorted keys, no spaces) with the files' digests left
        out -- they are digests of the sealed files, which depend on this -- so any edit of any other
        field (or a sealed file moved into another set) makes every sealed file fail to open.
        """
        data = json.loads(json.dumps(self.raw if self.raw is not None else self.to_dict()))
        for target in data.get("targets", {}).values():
            for entry in target.get("files", []) if isinstance(target, dict) else []:
                if isinstance(entry, dict):
                    entry.pop("sha256", None)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(b"keyedge/sealed-manifest/v1\x00" + canonical.encode()).digest()

    # ---- what readers ask ---------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.model["name"]

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None for a dynamic batch."""
        first = self.input["shape"][0]
        return first if first > 0 else None

    @property
    def image_size(self) -> int:
        return self.input["shape"][-1]

    @property
    def deployed_posture(self) -> Posture:
        """What the set answers and how; ``scores`` without a guard for sets written before postures."""
        return Posture.from_dict(self.posture) if self.posture is not None else SCORES

    @property
    def defense_name(self) -> str:
        return self.defense["name"] if self.defense else "keyed"

    @property
    def role(self) -> str:
        return get_defense(self.defense_name).role(self.fingerprint)

    @property
    def test_accuracy(self) -> float | None:
        value = self.checkpoint.get("test_accuracy")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def checkpoint_path(self) -> Path | None:
        value = self.checkpoint.get("path")
        return Path(value) if isinstance(value, str) and value else None

    def artifact(self, target: str) -> Path:
        """The main file of ``target``'s artifact (``model.onnx``, ``model.xml``, ``model.mlpackage``)."""
        suffix = get_backend(target).suffix
        files = [Path(f["path"]) for f in self.targets[target].files]
        main = next((f for f in files if Path(f.name.removesuffix(SEALED_SUFFIX)).suffix == suffix), None)
        if main is None:  # an .mlpackage is listed by its member files
            main = next((Path(f.parts[0]) for f in files if Path(f.parts[0]).suffix == suffix), files[0])
        return (self.directory or Path(".")) / main

    # ---- the set's files against the manifest ---------------------------------------------------------------------
    def target_files(self, target: str) -> list[tuple[dict[str, str], Path]]:
        """``target``'s listed files, each ``(entry, path)``: the entry (``path``, ``sha256``) and where it is."""
        directory = self.directory or Path(".")
        return [(entry, directory / entry["path"]) for entry in self.targets[target].files]

    def unlisted_files(self) -> list[str]:
        """Files in the set's directory that no target lists (besides manifest.json and manifest.sig), sorted.

        The manifest (and a signature over it) covers only what it lists: a file added beside a signed
        model -- an ONNX external-data file, an OpenVINO ``.bin`` a loader might pick up -- is covered by nothing.
        """
        directory = self.directory or Path(".")
        listed = {str(Path(entry["path"])) for target in self.targets for entry in self.targets[target].files}
        listed |= {"manifest.json", "manifest.sig"}
        found = (p for p in directory.rglob("*") if p.is_file() or p.is_symlink())
        return sorted(rel for rel in (str(p.relative_to(directory)) for p in found) if rel not in listed)

    def check_files(self, targets: list[str] | None = None) -> int:
        """Raise :class:`VerificationError` unless every listed file (of ``targets``) is here with its SHA-256.

        Returns how many files were checked.
        """
        count = 0
        for target in targets or list(self.targets):
            for entry, path in self.target_files(target):
                if not path.is_file():
                    raise VerificationError(f"{path} is missing from its artifact set", "copy the artifact set again")
                if sha256_file(path) != entry["sha256"]:
                    raise VerificationError(
                        f"{path} does not match its SHA-256 in manifest.json (changed, corrupted or swapped)",
                        "do not deploy it; copy the artifact set again, or export again",
                    )
                count += 1
        return count

    # ---- serialization ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return (
            {
                "schema": SCHEMA,
                "created": self.created,
                "fingerprint": self.fingerprint,
                "block_size": self.block_size,
                "key_note": self.key_note,
                "defense": self.defense,
                "model": self.model,
                "finetune": self.finetune,
                "lora_merged": self.lora_merged,
                "fuse": self.fuse,
                "fuse_requested": self.fuse_requested,
                "fuse_note": self.fuse_note,
                "precision": self.precision,
                "input": self.input,
                "output": self.output,
                "normalization": self.normalization,
                "checkpoint": self.checkpoint,
                "verification": self.verification,
                "targets": {name: t.to_dict() for name, t in self.targets.items()},
                "versions": self.versions,
            }
            | ({"posture": self.posture} if self.posture is not None else {})
            | ({"seal": self.seal} if self.seal is not None else {})
        )

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_fields(cls, f: Fields, directory: Path | None = None) -> ArtifactManifest:
        f.schema_version(SCHEMA, FORMAT, "export manifest")
        m = f.obj("model")
        model = dict(m.data)
        m.str("name")
        m.int("num_classes", low=1, high=MAX_CLASSES)
        m.strs("classes", optional=True)
        defense = defense_record(f)
        inp, shape = _input(f)
        out = f.obj("output")
        out.str("name")
        ck = f.obj("checkpoint", optional=True)
        if ck is not None:
            ck.str("path", optional=True)
            ck.float("test_accuracy", low=0.0, high=1.0, optional=True)
        targets_f = f.obj("targets")
        targets = _targets(targets_f)
        fingerprint = f.str("fingerprint", pattern=FINGERPRINT, optional=True)
        sealed = _seal(f, targets_f, targets)
        posture = _posture(f, int(m.data["num_classes"]))
        return cls(
            model=model,
            fingerprint=fingerprint,
            block_size=f.int("block_size", low=1, high=shape[2], optional=True),
            fuse=f.str("fuse", choices=FUSES),
            precision=f.str("precision", choices=PRECISIONS),
            input=dict(inp.data),
            output=dict(out.data),
            targets=targets,
            checkpoint=dict(ck.data) if ck else {},
            defense=defense,
            finetune=f.str("finetune", default="full"),
            lora_merged=f.bool("lora_merged", default=False),
            fuse_requested=f.str("fuse_requested", optional=True),
            fuse_note=f.str("fuse_note", optional=True),
            key_note=f.str("key_note", optional=True),
            normalization=f.dict("normalization", optional=True) or {},
            verification=f.dict("verification", optional=True) or {},
            versions=f.dict("versions", optional=True) or {},
            created=f.str("created", default=""),
            seal=sealed,
            posture=posture,
            directory=directory,
            raw=f.data,
        )

    @classmethod
    def read(cls, directory: str | Path) -> ArtifactManifest:
        """Read and validate ``directory/manifest.json``."""
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise ManifestError(f"{directory} has no {MANIFEST}", "pass a directory written by `keyedge export`")
        return cls.from_fields(read_json(directory / MANIFEST, "export manifest", HINT), directory)


def is_export_directory(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


# ---- reading, field by field ----------------------------------------------------------------------------------------


def _input(f: Fields) -> tuple[Fields, list[int]]:
    """The ``input`` object and its shape, ``[batch or -1, 3, S, S]``."""
    inp = f.obj("input")
    shape = inp.ints("shape")
    if (
        len(shape) != 4
        or shape[1] != 3
        or not (shape[0] == -1 or 1 <= shape[0] <= MAX_BATCH)
        or not (1 <= shape[2] <= MAX_IMAGE_SIZE and shape[2] == shape[3])
    ):
        raise inp.fail("shape", f"must be [batch or -1, 3, S, S] with 1 <= S <= {MAX_IMAGE_SIZE}, got {shape!r}")
    inp.str("name")
    return inp, shape


def _targets(targets_f: Fields) -> dict[str, TargetRecord]:
    """Every target's record; a target keyedge does not know, or none at all, is refused."""
    known = list_backends()
    targets = {}
    for target in targets_f.data:
        if target not in known:
            raise targets_f.fail(target, f"is not a known target ({', '.join(known)})")
        t = targets_f.obj(target)
        files = _files(t)  # checked first, as ever: which field a broken manifest is refused by
        targets[target] = TargetRecord(
            fuse=t.str("fuse", choices=FUSES),
            files=files,
            graph=t.dict("graph", optional=True) or {},
            io=t.dict("io", optional=True) or {},
            source=t.str("source", default="full-export"),
            parity=Parity.from_dict(t.dict("parity", optional=True) or {}),
            form_choice=t.dict("form_choice", optional=True),
        )
    if not targets:
        raise targets_f.fail("", "lists no artifact")
    return targets


def _files(t: Fields) -> list[dict[str, str]]:
    """A target's file list: a non-empty list of ``{path inside the directory, sha256}``."""
    raw_files = t.raw("files")
    if not isinstance(raw_files, list) or not raw_files:
        raise t.fail("files", f"must be a non-empty list, got {raw_files!r}"[:120])
    files = []
    for i, entry in enumerate(raw_files):
        if not isinstance(entry, dict):
            raise t.fail(f"files[{i}]", "must be an object with path and sha256")
        e = t.sub(entry, f"files[{i}].")
        files.append({"path": e.relative_path("path"), "sha256": e.str("sha256", pattern=SHA256)})
    return files


def _posture(f: Fields, num_classes: int) -> dict[str, Any] | None:
    """The ``posture`` record (version 2), checked against its spec and the model; None when absent."""
    record = f.dict("posture", optional=True)
    if record is None:
        return None
    try:
        posture = Posture.from_dict(record)
    except PostureError as exc:
        raise f.fail("posture", exc.message) from None
    if posture.topk is not None and posture.topk > num_classes:
        raise f.fail("posture", f"answers the top {posture.topk} of a model with {num_classes} classes")
    return record


def _seal(f: Fields, targets_f: Fields, targets: dict[str, TargetRecord]) -> dict[str, Any] | None:
    """The ``seal`` record of a sealed set (every file then sealed), or None."""
    sealed = f.obj("seal", optional=True)
    if sealed is None:
        return None
    sealed.str("format", choices=(SEALED_FORMAT,))
    sealed.str("cipher", choices=(CIPHER,))
    sealed.str("sealkey", pattern=FINGERPRINT)
    sealed.str("set", pattern=FINGERPRINT)
    for target, record in targets.items():
        if not all(entry["path"].endswith(SEALED_SUFFIX) for entry in record.files):
            raise targets_f.fail(target, "lists a file that is not sealed, in a sealed set")
    return dict(sealed.data)
