"""The seed document's serving pattern, as `genmesh bench serve --baseline seed-fastapi`
runs it: a FastAPI app whose endpoint calls HF transformers' blocking ``model.generate``
once per request, on the same model folder and dtype as the mesh's worker.

What the pattern most plausibly is, and what this app does:
- a plain (sync) FastAPI endpoint: FastAPI runs it on its thread pool, so concurrent
  requests run concurrent, independent ``generate`` calls on one shared model: no
  batching, no KV reuse, no scheduling;
- greedy decoding; ``ignore_eos`` maps to ``min_new_tokens`` so output lengths match
  the mesh's;
- ``POST /generate`` returns the whole text (the pattern as written: TTFT would equal
  end-to-end latency), and ``POST /generate_stream`` is the same blocking ``generate`` in
  its own thread with a streamer that hands each token to the response as it is made
  (newline-delimited JSON). The benchmark uses the streaming endpoint, so the baseline's
  TTFT and inter-token latency are its real ones, not its end-to-end latency.

``python -m genmesh.bench.seed_fastapi --model-dir DIR --port P`` serves it with uvicorn
on loopback; ``seed_server`` starts that as a subprocess for the benchmark.
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from genmesh.launcher.ports import free_ports
from genmesh.launcher.supervisor import terminate


class Message(BaseModel):
    role: str
    content: str


class GenerateBody(BaseModel):
    messages: list[Message] | None = None  # a chat, rendered with the model's template
    prompt: str | None = None  # or raw text to complete
    max_tokens: int = 64
    ignore_eos: bool = False  # generate exactly max_tokens tokens


class TokenQueue:
    """A transformers streamer (``put``/``end``) that passes each new token id to a
    queue; ``generate`` first puts the prompt, which is skipped. None ends the stream."""

    def __init__(self) -> None:
        self.items: queue.Queue[int | BaseException | None] = queue.Queue()
        self._has_prompt_passed = False

    def put(self, value: torch.Tensor) -> None:
        if not self._has_prompt_passed:
            self._has_prompt_passed = True
            return
        for token_id in value.reshape(-1).tolist():
            self.items.put(int(token_id))

    def end(self) -> None:
        self.items.put(None)


class IncrementalText:
    """Text of a growing list of token ids, released piece by piece; a piece that ends
    in a partial UTF-8 character waits for the next token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.num_released_chars = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.num_released_chars:]
        self.num_released_chars = len(text)
        return piece


def create_app(model: Any, tokenizer: Any) -> FastAPI:
    """The app around a loaded model and tokenizer (HF's, or anything with the same
    ``generate``, ``apply_chat_template``, ``encode`` and ``decode``)."""
    app = FastAPI(title="seed-fastapi baseline")
    eos_id = tokenizer.eos_token_id

    def encode(body: GenerateBody) -> list[int]:
        if (body.messages is None) == (body.prompt is None):
            raise HTTPException(422, "pass exactly one of messages or prompt")
        if body.max_tokens < 1:
            raise HTTPException(422, "max_tokens must be at least 1")
        text = body.prompt if body.messages is None else tokenizer.apply_chat_template(
            [m.model_dump() for m in body.messages], add_generation_prompt=True,
            tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def generate(prompt_ids: list[int], body: GenerateBody, streamer: Any = None
                 ) -> list[int]:
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=body.max_tokens,
                                 min_new_tokens=body.max_tokens if body.ignore_eos else 0,
                                 pad_token_id=eos_id, streamer=streamer)
        return [int(t) for t in out[0, len(prompt_ids):].tolist()]

    def finish_reason(output_ids: list[int], body: GenerateBody) -> str:
        is_stopped = bool(output_ids) and output_ids[-1] == eos_id and not body.ignore_eos
        return "stop" if is_stopped or len(output_ids) < body.max_tokens else "length"

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate")
    def generate_whole(body: GenerateBody) -> dict[str, Any]:
        prompt_ids = encode(body)
        output_ids = generate(prompt_ids, body)
        return {"text": tokenizer.decode(output_ids, skip_special_tokens=True),
                "finish_reason": finish_reason(output_ids, body),
                "prompt_tokens": len(prompt_ids), "completion_tokens": len(output_ids)}

    @app.post("/generate_stream")
    def generate_stream(body: GenerateBody) -> StreamingResponse:
        prompt_ids = encode(body)
        streamer = TokenQueue()

        def run() -> None:
            try:
                generate(prompt_ids, body, streamer)
            except BaseException as exc:
                streamer.items.put(exc)

        threading.Thread(target=run, name="generate", daemon=True).start()

        def lines() -> Iterator[str]:
            text = IncrementalText(tokenizer)
            while (item := streamer.items.get()) is not None:
                if isinstance(item, BaseException):
                    yield json.dumps({"error": f"{type(item).__name__}: {item}"}) + "\n"
                    return
                yield json.dumps({"text": text.push(item)}) + "\n"
            yield json.dumps({"finish_reason": finish_reason(text.ids, body),
                              "prompt_tokens": len(prompt_ids),
                              "completion_tokens": len(text.ids)}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


def load_app(model_dir: Path, dtype: str) -> FastAPI:
    """The app on the store folder's model, as the seed document loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    return create_app(model.eval(), tokenizer)


@contextmanager
def seed_server(model_dir: Path, *, dtype: str, log_path: Path,
                timeout_s: float = 180.0) -> Iterator[str]:
    """The app as a uvicorn subprocess on a free loopback port, until the block ends;
    yields its base URL."""
    port = free_ports(1)[0]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "genmesh.bench.seed_fastapi", "--model-dir", str(model_dir),
             "--dtype", dtype, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, timeout_s=timeout_s, log_path=log_path)
        yield url
    finally:
        terminate(proc, grace_s=20)


def _wait_healthy(url: str, proc: subprocess.Popen, *, timeout_s: float,
                  log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the seed-fastapi server exited with {proc.returncode}; "
                               f"see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the seed-fastapi server was not up after {timeout_s} s; "
                               f"see {log_path}")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True, help="an HF model folder")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    uvicorn.run(load_app(args.model_dir, args.dtype), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
