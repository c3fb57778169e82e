"""Options shared by commands, declared once here: ``--key-file``, ``--overwrite``, ``--target``, ``--device``.

Old spellings come in two kinds: :func:`renamed` ones still work for one release (hidden; given, they print
one ``note:`` line on stderr and then mean the new option), :func:`retired` ones are refused with a
one-line error naming the new option.
"""

from __future__ import annotations

from typing import Any

import typer

from keyedge.errors import KeyedgeError

NEXT_RELEASE = "will be removed in the next release"


def key_file_option(help: str, *, required: bool = False) -> Any:
    """The one ``--key-file`` (``-k``): a secret key file. A command taking several declares ``list[Path] | None``."""
    return typer.Option(... if required else None, "--key-file", "-k", help=help)


def overwrite_option(help: str) -> Any:
    """The one ``--overwrite``: replace output that exists. ``help`` says what is replaced ("Replace ...")."""
    return typer.Option(False, "--overwrite", help=help)


def old_force() -> Any:
    """``--force``, the old spelling of ``--overwrite`` (one release): a note, then it means ``--overwrite``."""
    return renamed("--force", new="--overwrite", flag=True)


def target_option() -> Any:
    """The one ``--target`` (``-t``): export targets, repeatable, ``all`` for every installed one."""
    return typer.Option(
        ["onnx"],
        "--target",
        "-t",
        help="onnx, openvino, coreml, litert, executorch, mnn, ncnn, rknn, pt2 or all (installed ones; repeatable).",
    )


def sign_key_option(what: str) -> Any:
    """The one ``--sign-key``: a signing key file (``keyedge signkey new``); ``what`` says what is signed."""
    return typer.Option(
        None,
        "--sign-key",
        help=f"Signing key file (keyedge signkey new): sign {what} (Ed25519) so that `keyedge verify --verify-key` "
        "and loaders can refuse a swapped or edited one.",
    )


def seed_option(help: str) -> Any:
    """The one ``--seed``: 0..2**32-1, what every generator keyedge seeds accepts (a larger one is a usage error)."""
    from keyedge.validate import MAX_SEED

    return typer.Option(0, "--seed", min=0, max=MAX_SEED, help=help)


def device_option(help: str = "Torch device: auto, cpu, cuda, cuda:N or mps.") -> Any:
    """The one ``--device``: a torch device (device profiles are ``--profile``)."""
    return typer.Option("auto", "--device", help=help)


def note_renamed(old: str, new: str) -> None:
    """The one line an old spelling prints before it does what it always did."""
    from keyedge.cli._console import err_console

    err_console.print(f"note: {old} is now {new}; {old} {NEXT_RELEASE}", markup=False, highlight=False)


def renamed(*names: str, new: str, flag: bool = False) -> Any:
    """A hidden ``typer.Option`` under an old spelling that still works: given, it prints :func:`note_renamed`.

    The command then reads it as the new option (e.g. ``overwrite = overwrite or force``).
    """

    def note(value: Any) -> Any:
        if value not in (None, False):
            note_renamed(names[0], new)
        return value

    return typer.Option(False if flag else None, *names, hidden=True, callback=note)


def retired(*names: str, message: str, hint: str, flag: bool = False) -> Any:
    """A hidden ``typer.Option`` under the old ``names``: given at all, it raises ``KeyedgeError(message, hint)``."""

    def refuse(value: Any) -> None:
        if value not in (None, False):
            raise KeyedgeError(message, hint)

    return typer.Option(False if flag else None, *names, hidden=True, is_eager=True, callback=refuse)


def expand_targets(names: list[str], precision: str = "fp32", *, randomized: bool = False) -> list[str]:
    """``--target`` values in order, duplicates dropped; unknown: one line.

    ``all`` is every backend whose extra is installed, that exports ``precision`` and, for a posture with in-graph
    noise (``randomized``), has a random op (every backend when none is installed: the export then names the
    extra); a target named explicitly is kept, and refused later.
    """
    from keyedge.deps import EXTRAS, installed
    from keyedge.exporters import get_backend, list_backends

    def here(target: str) -> bool:  # a converter in its own environment (rknn) is there when its backend says so
        backend = get_backend(target)
        return installed(backend.extra) or bool(EXTRAS[backend.extra].command and backend.available()[0])

    present = [t for t in list_backends() if here(t)] or list_backends()
    present = [t for t in present if precision in get_backend(t).precisions]
    present = [t for t in present if get_backend(t).random_ops or not randomized]
    targets: list[str] = []
    for name in names:
        for target in present if name == "all" else [name]:
            get_backend(target)  # unknown target: a clear error before any work
            if target not in targets:
                targets.append(target)
    return targets
