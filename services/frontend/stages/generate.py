"""The generate stage, the end of the chain: one worker Generate stream per request.

It streams ``Started`` once the worker's headers name the version that serves the
request, then the worker's messages (token ids) as they come, then ``Finished`` with the
worker's usage. It is the one stage that adds to the request's token count. Whatever ends
the stream (done, a stop string, the caller gone, an error) cancels the worker's request,
which frees its KV blocks within a step.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator, Callable

import grpc

from genmesh.core import metadata
from genmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.telemetry import trace_metadata
from services.frontend.errors import PipelineError, rpc_error
from services.frontend.events import Finished, Started
from services.frontend.logprobs import set_worker_logprobs
from services.frontend.routing import Affinity, ab_bucket, prefix_key
from services.frontend.stages.call import Call, StageEvent

# How long a version the split answered stands in for it while no worker answers, so
# that the response cache can still answer (a rollout change is rarer than this).
LAST_ROUTED_TTL_S = 60.0
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Generate:
    def __init__(self, worker: worker_pb2_grpc.WorkerStub, *, affinity: Affinity,
                 rpc_timeout_s: float, versions: tuple[str, ...] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.worker = worker
        self.affinity = affinity  # how the prompt's first blocks name the replica to reach
        self.rpc_timeout_s = rpc_timeout_s  # deadline of the unary GetStats
        # The versions this frontend serves (requests pinned elsewhere are refused); with
        # one, the split has nothing to choose: it is the routed version, unasked.
        self.versions = versions
        self._clock = clock
        # The split's last answer per A/B bucket (None: not bucketed): (version, when).
        self._last_routed: dict[str | None, tuple[str, float]] = {}

    async def run(self, call: Call) -> AsyncGenerator[StageEvent, None]:
        req = call.req
        params = common_pb2.SamplingParams()
        params.CopyFrom(req.params)
        del params.stop[:]  # stop strings are cut from the text, in the stops stage
        set_worker_logprobs(params)
        worker_call = self.worker.Generate(worker_pb2.WorkerGenerateRequest(
            # The worker's id must be unique even when callers reuse theirs.
            request_id=f"{req.request_id}.{secrets.token_hex(3)}", prompt_ids=call.prompt_ids,
            params=params, priority=req.priority, cache_salt=req.tenant),
            timeout=call.timeout_s, metadata=self.metadata(call) + trace_metadata())
        try:
            served = dict(await worker_call.initial_metadata() or ())
            yield Started(req.request_id, req.model,
                          str(served.get(metadata.MODEL_VERSION, req.model_version)),
                          len(call.prompt_ids), req.messages if req.prompt is None else ())
            tokens, observer = call.tokens, call.observer
            async for msg in worker_call:
                call.prefilled.set()
                num_tokens = len(msg.token_ids)
                tokens.num_generated += num_tokens
                observer.tokens(num_tokens)
                if msg.finish_reason:
                    if msg.finish_reason == common_pb2.FINISH_REASON_ERROR:
                        raise PipelineError(grpc.StatusCode.INTERNAL,
                                            f"generation failed: {msg.error}")
                    yield msg
                    yield Finished(msg.finish_reason, msg.usage)
                    return
                yield msg
            raise PipelineError(grpc.StatusCode.UNAVAILABLE,
                                "the worker stream ended without a finish; retry")
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "worker") from None
        finally:
            worker_call.cancel()

    async def routed_version(self, call: Call) -> str:
        """The version the rollout's split picks for this request: a stats call through
        the same route and headers as Generate answers with the version it reached.
        While no worker answers, the split's last answer for the same A/B bucket (if
        under LAST_ROUTED_TTL_S old), so that cached answers are still served; without
        one, UNAVAILABLE. A frontend serving one version answers it without a call."""
        if len(self.versions) == 1:
            return self.versions[0]
        bucket = ab_bucket(call.req.tenant)
        try:
            stats = await self.worker.GetStats(worker_pb2.GetStatsRequest(),
                                               timeout=self.rpc_timeout_s,
                                               metadata=self.metadata(call))
        except grpc.aio.AioRpcError as exc:
            last = self._last_routed.get(bucket)
            if (exc.code() in _UNREACHABLE and last is not None
                    and self._clock() - last[1] <= LAST_ROUTED_TTL_S):
                return last[0]
            raise rpc_error(exc, "worker") from None
        self._last_routed[bucket] = (stats.model_version, self._clock())
        return stats.model_version

    def metadata(self, call: Call) -> tuple[tuple[str, str], ...]:
        """Headers that route the worker call: Envoy reads the version (pinned, or routed
        by the split), the prefix key (replica affinity) and the tenant's A/B bucket."""
        req = call.req
        pairs = [(metadata.REQUEST_ID, req.request_id)]
        if req.model_version:
            pairs.append((metadata.ROUTED_VERSION if req.is_version_routed
                          else metadata.MODEL_VERSION, req.model_version))
        key = prefix_key(req.tenant, call.prompt_ids, block_size=self.affinity.block_size,
                         max_blocks=self.affinity.max_blocks)
        if key is not None:
            pairs.append((metadata.PREFIX_KEY, key))
        bucket = ab_bucket(req.tenant)
        if bucket is not None:
            pairs.append((metadata.AB_BUCKET, bucket))
        return tuple(pairs)
