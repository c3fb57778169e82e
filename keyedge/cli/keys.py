"""``keyedge key new|show|import-seed``, ``keyedge sealkey new|show``, ``keyedge signkey new``: create and inspect keys.

``keyedge keygen`` is the old name of ``keyedge key new`` (hidden; it works as before).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from keyedge.cli._console import console, err_console
from keyedge.cli._flags import old_force, overwrite_option
from keyedge.fileio import check_writable
from keyedge.keys.keyfile import Key, insecure_permissions, load_key

key_app = typer.Typer(
    help="Create, inspect and import secret key files.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _saved(key: Key, out: Path) -> None:
    moved = "all moved" if key.fixed_points == 0 else f"{key.moved_fraction:.1%} moved"
    console.print(
        f"wrote {out} (mode 0600): block size {key.block_size}, fingerprint "
        f"{key.fingerprint}, {key.size} values per block, {moved}"
    )
    console.print("keep this file secret: whoever holds it can attack the models made with it")


def key_new(
    out: Path = typer.Option(..., "--out", "-o", help="Key file to create (written with mode 0600)."),
    block_size: int = typer.Option(
        4,
        "--block-size",
        "-b",
        min=1,
        max=128,
        help="Block size P; must divide the model's input size (and its patch size to fold).",
    ),
    overwrite: bool = overwrite_option("Replace OUT if it exists (the old key is lost)."),
    force: bool = old_force(),
    allow_fixed_points: bool = typer.Option(
        False, "--allow-fixed-points", help="Do not require every position to move (weaker; not recommended)."
    ),
) -> None:
    """Generate a new secret key file from 256 bits of OS randomness (formerly `keyedge keygen`)."""
    overwrite = overwrite or force
    check_writable(out, overwrite=overwrite, flag="--overwrite")
    key = Key.generate(block_size, derangement=not allow_fixed_points)
    _saved(key, key.save(out, overwrite=overwrite))


def show(
    key_file: Path = typer.Argument(..., help="Key file to inspect."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    reveal: bool = typer.Option(False, "--reveal", help="Also print the secret permutation."),
) -> None:
    """Show a key's version, block size, fingerprint and strength; never the secret unless --reveal."""
    key = load_key(key_file)
    if insecure_permissions(key_file):
        err_console.print(f"warning: {key_file} is readable by others; run: chmod 600 {key_file}", markup=False)
    info = key.describe(reveal=reveal)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=str(key_file), show_header=False, title_justify="left")
    labels = {
        "format_version": "format version",
        "block_size": "block size",
        "channels": "channels",
        "source": "source",
        "fingerprint": "fingerprint",
        "permutation_length": "values per block",
        "fixed_points": "fixed points",
        "moved_fraction": "positions moved",
        "key_space_bits": "key space (bits)",
    }
    for field, label in labels.items():
        value = info[field]
        table.add_row(label, f"{value:.1%}" if field == "moved_fraction" else str(value))
    console.print(table)
    if reveal:  # on its own line, unwrapped, so it can be copied
        console.print("permutation: " + " ".join(map(str, info["permutation"])), markup=False)


def import_seed(
    seed: int = typer.Argument(..., min=0, help="Integer seed of the reference code's key."),
    out: Path = typer.Option(..., "--out", "-o", help="Key file to create (mode 0600)."),
    block_size: int = typer.Option(
        ..., "--block-size", "-b", min=1, max=128, help="Block size P the key was used with."
    ),
    overwrite: bool = overwrite_option("Replace OUT if it exists."),
    force: bool = old_force(),
) -> None:
    """Import a reference-code key: the permutation torch.manual_seed(SEED); torch.randperm(3*P*P)."""
    overwrite = overwrite or force
    check_writable(out, overwrite=overwrite, flag="--overwrite")
    key = Key.from_seed(seed, block_size)
    _saved(key, key.save(out, overwrite=overwrite))
    err_console.print(
        "note: an integer seed holds at most 64 bits and small seeds are guessable; "
        "prefer `keyedge key new` for new deployments",
        markup=False,
    )


sealkey_app = typer.Typer(
    help="Device sealing keys: encrypt exported artifacts at rest (export --seal).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def sealkey_new(
    out: Path = typer.Option(..., "--out", "-o", help="Sealing key file to create (written with mode 0600)."),
    overwrite: bool = overwrite_option("Replace OUT if it exists (artifacts sealed with it are lost)."),
    force: bool = old_force(),
) -> None:
    """Generate a device sealing key (256 random bits) for `keyedge export --seal`."""
    from keyedge.keys.seal import SealKey

    overwrite = overwrite or force
    check_writable(out, overwrite=overwrite, flag="--overwrite")
    key = SealKey.generate()
    path = key.save(out, overwrite=overwrite)
    console.print(f"wrote {path} (mode 0600): sealing key, fingerprint {key.fingerprint}", markup=False)
    console.print("keep it on the device (or in its secure store) only: it opens the artifacts sealed with it")


def sealkey_show(
    key_file: Path = typer.Argument(..., help="Sealing key file to inspect."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Show a sealing key's fingerprint and cipher (never the key)."""
    from keyedge.keys.seal import load_sealkey

    info = load_sealkey(key_file).describe()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for field, value in info.items():
        console.print(f"{field.replace('_', ' ')}: {value}", markup=False)


signkey_app = typer.Typer(
    help="Manifest signing keys (Ed25519): export --sign-key, verify --verify-key.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def signkey_new(
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Signing key file to create (0600); the verify key goes beside it with the suffix .pub "
        "(signer.key -> signer.pub).",
    ),
    overwrite: bool = overwrite_option("Replace OUT and its .pub if they exist."),
    force: bool = old_force(),
) -> None:
    """Generate an Ed25519 signing key (private, 0600) and its verify key (OUT's name with .pub, shareable)."""
    from keyedge.keys.signing import SigningKey

    overwrite = overwrite or force
    key = SigningKey.generate()
    path, public_path = key.save_pair(out, overwrite=overwrite)
    console.print(
        f"wrote {path} (mode 0600, keep it secret) and {public_path} (give it to devices): "
        f"signing key {key.fingerprint}",
        markup=False,
    )


def register(app: typer.Typer) -> None:
    key_app.command("new")(key_new)
    app.command(  # the old name, kept: hidden from `keyedge --help`, same options and behaviour
        "keygen", hidden=True, help="Old name of `keyedge key new` (same options): generate a new secret key file."
    )(key_new)
    key_app.command("show")(show)
    key_app.command("import-seed")(import_seed)
    app.add_typer(key_app, name="key")
    sealkey_app.command("new")(sealkey_new)
    sealkey_app.command("show")(sealkey_show)
    app.add_typer(sealkey_app, name="sealkey")
    signkey_app.command("new")(signkey_new)
    app.add_typer(signkey_app, name="signkey")
