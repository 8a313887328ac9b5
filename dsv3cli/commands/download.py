"""Download a checkpoint from the Hugging Face hub, with a disk preflight, filters, resume and sha256 verification.

REPO is a repo id (owner/name) or an alias: v3, v3-0324, v3.1, v3-base, r1, r1-0528, kimi-k2, moonlight, v2-lite (default: deepseek-ai/DeepSeek-V3). HF_ENDPOINT and HF_TOKEN are honoured.

A rerun skips files already complete and verified, and continues partial ones where they stopped. The download refuses to start when the free disk is below what remains (--force overrides).

Examples:

  dsv3 download v3 --local-dir /data/DeepSeek-V3 --dry-run

  dsv3 download r1 --local-dir /data/R1 --verify

  dsv3 download v3 --local-dir /data/v3-mtp --only mtp

  dsv3 download deepseek-ai/DeepSeek-V3 --local-dir /data/v3 --include "*.json" --exclude "figures/*"
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import DsvError
from ..options import JsonOpt, RevisionOpt, TokenOpt

NAME = "download"


class Only(str, Enum):
    config = "config"
    tokenizer = "tokenizer"
    mtp = "mtp"


_STATUS = {"complete": "complete", "unverified": "on disk, to be hashed", "differs": "differs, refetch",
           "missing": ""}


def command(
    repo: Annotated[Optional[str], typer.Argument(help="Repo id or alias (v3, v3-0324, v3.1, v3-base, r1, r1-0528, kimi-k2, moonlight, v2-lite).", show_default=False)] = None,
    local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="Where the files go (default: ./<repo name>).")] = None,
    revision: RevisionOpt = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only files matching this glob (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Skip files matching this glob (repeatable).")] = None,
    only: Annotated[Optional[list[Only]], typer.Option("--only", help="Only the config files, the tokenizer, or the MTP layer's shards (+ config and index); repeatable.")] = None,
    max_workers: Annotated[Optional[int], typer.Option("--max-workers", min=1, help="Files fetched (and hashed) in parallel.", show_default="8")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, hidden=True)] = None,  # old spelling
    token: TokenOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the files, sizes, what is already complete and the free disk; write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start even when the free disk is below what remains to fetch.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="After downloading, check every file's sha256 against the hub and the checkpoint's format; refetch what fails.")] = False,
    as_json: JsonOpt = False,
) -> None:
    from huggingface_hub.utils import logging as hf_logging

    from .. import hub

    # Its retry warnings would tear the progress bar; our own one-line errors say what failed.
    hf_logging.set_verbosity_error()
    repo_id = hub.resolve_repo(repo)
    target = local_dir if local_dir is not None else Path(repo_id.split("/")[1])
    plan = hub.plan_download(repo_id, target, revision=revision, token=token, include=include or [],
                             exclude=exclude or [], only=[o.value for o in only or []])
    if dry_run:
        _render_plan(plan, as_json)
        return
    result = hub.download(plan, workers=max_workers or workers or 8, force=force, verify=verify)
    _render_result(result, as_json)
    if not result.ok:
        failing = (result.verify.problems if result.verify else []) + (result.format_problems or [])
        raise DsvError(f"{plan.local_dir}: {len(failing)} problem(s) after verification: " + "; ".join(failing))


def _render_plan(plan: hub.Plan, as_json: bool) -> None:
    from .. import hub

    if as_json:
        print(json.dumps(plan.as_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    s = plan.snapshot
    table = Table(title=f"{s.repo_id} @ {s.commit[:12]} -> {plan.local_dir}", title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("local")
    for lf in plan.files:
        status = f"partial {lf.have / lf.remote.size:.0%}" if lf.status == "partial" else _STATUS[lf.status]
        table.add_row(lf.remote.path, hub.human(lf.remote.size), status)
    console = Console()  # the terminal's width, else $COLUMNS, else 80
    console.print(table)
    done = sum(1 for lf in plan.files if lf.status == "complete")
    print(f"{len(plan.files)} files, {hub.human(plan.total)} in all; {done} complete; "
          f"to fetch: {hub.human(plan.remaining)}; free at {plan.local_dir}: {hub.human(plan.free)}")
    if plan.remaining > plan.free:
        print("not enough free disk: the download would refuse to start (--force overrides)")
    if s.gated:
        print(f"{s.repo_id} is gated: downloading needs a token with access (--token or HF_TOKEN)")


def _render_result(result: hub.DownloadResult, as_json: bool) -> None:
    from .. import hub

    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    plan, st = result.plan, result.stats
    rate = st.bytes / result.seconds if result.seconds > 0 else 0.0
    print(f"{plan.snapshot.repo_id} @ {plan.snapshot.commit[:12]} -> {plan.local_dir}")
    for path, why in sorted(st.refetched.items()):
        print(f"fetched again: {path}: {why}")
    print(f"fetched {len(st.fetched)} file(s), {hub.human(st.bytes)} in {result.seconds:.1f} s "
          f"({hub.human(rate)}/s); {len(st.skipped)} already complete")
    if result.verify is not None:
        v = result.verify
        for problem in result.repaired:
            print(f"failed verification, fetched again: {problem}")
        print(f"verified {len(v.checked)} file(s) against the hub: " + ("all match" if v.ok else f"{len(v.bad)} still differ"))
        if result.format_problems is None:
            print("format check skipped: the folder does not hold a whole checkpoint")
        else:
            print("format check: " + ("ok" if not result.format_problems else f"{len(result.format_problems)} problem(s)"))
