"""`genmesh batch input.jsonl -o output.jsonl`: many prompts through GenerateBatch, with a
progress bar; resumable.

Input lines: ``{"id": ..., "prompt": ...}`` or ``{"id": ..., "messages": [{"role", "content"},
...]}``, with optional ``"params": {"max_tokens": ..., "temperature": ..., ...}`` (flags give
the defaults). An id is optional; a line without one is named by its line number.

Output lines, one per input line as it finishes (in any order): ``{"id", "text",
"finish_reason", "finish_detail", "model_version", "usage"}``, or ``{"id", "error": {"code",
"message"}}``. Rerunning with the same output skips the lines already done; lines that
failed are run again (their error lines are dropped first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from genmesh.client import BatchItem, BatchResult, Client, GenmeshError
from genmesh.client.sync import DEFAULT_ADDRESS
from genmesh.client.types import API_KEY_ENV, DEV_API_KEY

PARAM_NAMES = frozenset({"max_tokens", "temperature", "top_k", "top_p", "min_p",
                         "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos"})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="run a JSONL file of prompts through the mesh (resumable)")
    p.add_argument("input", type=Path, help="JSONL: {id, prompt | messages, params}")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="JSONL results; lines already there are skipped on a rerun")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="the mesh's edge (Envoy)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, DEV_API_KEY),
                   help=f"your tenant's key (default: ${API_KEY_ENV}, else the local dev key)")
    p.add_argument("--model", default="", help="empty: the deployment's default model")
    p.add_argument("--model-version", default="")
    p.add_argument("--max-tokens", type=int, default=256, help="default for lines without it")
    p.add_argument("--temperature", type=float, default=0.0, help="default for lines without it")
    p.add_argument("--timeout", type=float, default=86_400.0, help="seconds for the whole run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def read_items(path: Path, defaults: dict) -> list[BatchItem]:
    """Every line of ``path`` as a BatchItem; ValueError naming the first bad line."""
    items, seen = [], set()
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object")
            item_id = str(row.get("id", f"line-{number}"))
            if item_id in seen:
                raise ValueError(f"{where}: id {item_id!r} repeats an earlier line")
            seen.add(item_id)
            params = row.get("params") or {}
            if not isinstance(params, dict) or set(params) - PARAM_NAMES:
                raise ValueError(f"{where}: params must be an object with keys among "
                                 f"{', '.join(sorted(PARAM_NAMES))}")
            prompt, messages = row.get("prompt"), row.get("messages")
            if (prompt is None) == (messages is None):
                raise ValueError(f"{where}: give exactly one of prompt or messages")
            if messages is not None and not (isinstance(messages, list) and all(
                    isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)):
                raise ValueError(f"{where}: messages must be a list of {{role, content}}")
            items.append(BatchItem(item_id, prompt=None if prompt is None else str(prompt),
                                   messages=messages, params={**defaults, **params}))
    return items


def done_ids(output: Path) -> set[str]:
    """Ids finished in an earlier run. The output is rewritten without its error lines
    (and without a line cut short by a crash), so that it ends up with one line per id."""
    if not output.exists():
        return set()
    kept, ids = [], set()
    for line in output.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a run that was killed mid-write
        if isinstance(row, dict) and "error" not in row and "id" in row:
            kept.append(line)
            ids.add(str(row["id"]))
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, output)
    return ids


def result_row(r: BatchResult) -> dict:
    if r.error is not None:
        return {"id": r.id, "error": {"code": r.error.code.name, "message": r.error.message}}
    assert r.completion is not None
    c = r.completion
    return {"id": r.id, "text": c.text, "finish_reason": c.finish_reason,
            "finish_detail": c.finish_detail, "model_version": c.model_version,
            "usage": dataclasses.asdict(c.usage)}


def run_batch(client: Client, items: list[BatchItem], output: Path, *, model: str = "",
              model_version: str = "", progress: bool = True) -> tuple[int, int]:
    """Run the items not done yet, appending results to ``output``; (succeeded, failed)."""
    done = done_ids(output)
    todo = [i for i in items if i.id not in done]
    num_ok = num_failed = 0
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="prompt",
               disable=not progress, file=sys.stderr)
    with output.open("a") as out, bar:
        results: Iterator[BatchResult] = client.generate_batch(
            iter(todo), model=model, model_version=model_version)
        for result in results:
            out.write(json.dumps(result_row(result)) + "\n")
            out.flush()  # a killed run keeps every finished line
            num_failed += result.error is not None
            num_ok += result.error is None
            bar.update(1)
            bar.set_postfix(failed=num_failed)
    return num_ok, num_failed


def _run(args: argparse.Namespace) -> int:
    items = read_items(args.input, {"max_tokens": args.max_tokens,
                                    "temperature": args.temperature})
    with Client(args.address, timeout_s=args.timeout, api_key=args.api_key) as client:
        try:
            num_ok, num_failed = run_batch(client, items, args.output, model=args.model,
                                           model_version=args.model_version,
                                           progress=not args.no_progress)
        except GenmeshError as exc:
            print(f"genmesh: {exc} (rerun the same command to resume)", file=sys.stderr)
            return 1
    print(f"{num_ok} done, {num_failed} failed this run; results in {args.output}",
          file=sys.stderr)
    return 1 if num_failed else 0
