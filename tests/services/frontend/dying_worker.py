"""A stand-in worker process for the status-code tests: ``Generate`` streams three
messages, then, by the request id, fails as the worker itself would report it ("abort":
INTERNAL with a message) or waits for the test to kill the process ("hang").

    python -m tests.services.frontend.dying_worker PORT
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from genmesh.v1 import worker_pb2, worker_pb2_grpc

NUM_MESSAGES = 3  # streamed before the worker fails or hangs


class DyingWorker(worker_pb2_grpc.WorkerServicer):
    async def Generate(self, request: worker_pb2.WorkerGenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        for token_id in range(1, NUM_MESSAGES + 1):
            yield worker_pb2.WorkerGenerateResponse(token_ids=[token_id])
        if request.request_id.startswith("abort"):
            await context.abort(grpc.StatusCode.INTERNAL, "the KV pool is corrupt")
        await asyncio.sleep(3600)  # "hang": until the test kills this process


async def serve(port: int) -> None:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(DyingWorker(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
