#!/usr/bin/env node
// A third-party client of genmesh's public API: runs one bidirectional
// genmesh.v1.Generation/Chat session through the mesh, loading the .proto files
// as they are at run time (no generated code), so it proves that a gRPC
// implementation other than ours can speak the API.
//
//   node chat.js --address 127.0.0.1:8080 --model NAME --max-tokens N \
//       --turn "first message" --turn "second message" \
//       [--cancel-after-deltas K] [--logprobs K] [--timeout-ms 60000] \
//       [--metadata key=value ...] [--protos DIR]
//
// It opens the session, sends each turn only after the previous one has
// finished (TurnFinished or a ChatError), then ends the session and waits for
// the server to close the stream. With --cancel-after-deltas K it cancels the
// first turn after K deltas and expects it to finish with FINISH_REASON_ABORT.
// With --logprobs K the session asks for each token's logprob with its K most
// likely alternatives (SamplingParams.return_logprobs and .logprobs), and each
// turn lists the tokens its deltas carried, as OpenAI does ("bytes" as numbers).
//
// Output: one JSON object on stdout,
//   {"turns": [{"turn", "text", "deltas", "finish_reason", "usage", "request_id",
//               "logprobs": [{"token", "bytes", "logprob", "top_logprobs"}]}],
//    "errors": [{"source": "server"|"client", "code", "message", "turn"}]}
// and exit status 0 whenever the call itself ended with status OK; ChatError
// events and client-side findings (a cancelled turn that did not abort, a
// stream that ended early) are data, listed in "errors". A non-OK gRPC status,
// a transport failure or the overall timeout print to stderr and exit 1; bad
// arguments exit 2.

'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO_ROOT = path.resolve(__dirname, '..', '..');

const USAGE = `usage: node chat.js --address HOST:PORT [--model NAME] [--max-tokens N]
                    --turn TEXT [--turn TEXT ...] [--cancel-after-deltas K]
                    [--logprobs K] [--timeout-ms MS] [--api-key KEY]
                    [--metadata KEY=VALUE ...] [--protos DIR]
The API key (sent as x-api-key) defaults to $GENMESH_API_KEY.`;

function usageError(message) {
  process.stderr.write(`chat.js: ${message}\n${USAGE}\n`);
  process.exit(2);
}

// Non-negative integer flag, or the default when absent.
function intFlag(values, name, fallback) {
  const raw = values[name];
  if (raw === undefined) return fallback;
  if (!/^\d+$/.test(raw)) usageError(`--${name} must be a non-negative integer, got "${raw}"`);
  return Number(raw);
}

function parseCli(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: {
        address: { type: 'string' },
        model: { type: 'string', default: '' }, // empty: the deployment's default model
        'max-tokens': { type: 'string' },
        turn: { type: 'string', multiple: true, default: [] },
        'cancel-after-deltas': { type: 'string' },
        logprobs: { type: 'string' },
        'timeout-ms': { type: 'string' },
        'api-key': { type: 'string', default: process.env.GENMESH_API_KEY || '' },
        metadata: { type: 'string', multiple: true, default: [] },
        protos: { type: 'string', default: path.join(REPO_ROOT, 'protos') },
        help: { type: 'boolean', short: 'h', default: false },
      },
      strict: true,
      allowPositionals: false,
    });
  } catch (err) {
    usageError(err.message);
  }
  const v = parsed.values;
  if (v.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  if (!v.address) usageError('--address is required');
  if (v.turn.length === 0) usageError('at least one --turn is required');
  const cancelAfter = intFlag(v, 'cancel-after-deltas', null);
  if (cancelAfter === 0) usageError('--cancel-after-deltas must be >= 1');
  const timeoutMs = intFlag(v, 'timeout-ms', 60000);
  if (timeoutMs === 0) usageError('--timeout-ms must be >= 1');
  const metadata = new grpc.Metadata();
  for (const pair of v.metadata) {
    const eq = pair.indexOf('=');
    if (eq <= 0) usageError(`--metadata must be KEY=VALUE, got "${pair}"`);
    metadata.add(pair.slice(0, eq).toLowerCase(), pair.slice(eq + 1));
  }
  if (v['api-key'] && metadata.get('x-api-key').length === 0) {
    metadata.set('x-api-key', v['api-key']);
  }
  return {
    address: v.address,
    model: v.model,
    maxTokens: intFlag(v, 'max-tokens', 0), // 0: the server's default
    turns: v.turn,
    cancelAfter,
    logprobs: intFlag(v, 'logprobs', null), // null: no logprobs asked
    timeoutMs,
    metadata,
    protosDir: v.protos,
  };
}

function loadGenerationService(protosDir) {
  // The options the brief asks of every client: field names as in the .proto,
  // enums as their names (so finish reasons read "FINISH_REASON_STOP"), defaults
  // filled in, and the name of the set oneof member exposed (ChatEvent.event).
  const definition = protoLoader.loadSync(path.join(protosDir, 'genmesh/v1/generation.proto'), {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [protosDir],
  });
  return grpc.loadPackageDefinition(definition).genmesh.v1.Generation;
}

// An OutputLogprob as OpenAI's logprobs list it: bytes as an array of numbers.
function tokenLogprob(lp) {
  const entry = (t) => ({ token: t.token, bytes: Array.from(t.token_bytes), logprob: t.logprob });
  return { ...entry(lp), top_logprobs: lp.top_logprobs.map(entry) };
}

function runSession(opts) {
  const Generation = loadGenerationService(opts.protosDir);
  const client = new Generation(opts.address, grpc.credentials.createInsecure());

  const result = { turns: [], errors: [] };
  let nextTurn = 0; // index into opts.turns of the next turn to send
  let pending = null; // the running turn's entry in result.turns
  let lastFinishedTurn = 0; // server-side number of the last turn that finished
  let cancelSent = false;
  let staleCancel = false; // our cancel reached the server after its turn had ended
  let sessionEnded = false; // we sent EndSession
  let streamOpen = true; // the server has not closed the stream yet
  let sawEnd = false;
  let status = null;
  let done = false;

  // Settle exactly once, writing before exiting so a piped stdout is flushed.
  function finish(code, stream, text) {
    if (done) return;
    done = true;
    clearTimeout(timer);
    if (code !== 0) call.cancel(); // no-op once the call has ended
    client.close();
    stream.write(text, () => process.exit(code));
  }

  function fail(message) {
    const partial = JSON.stringify(result);
    finish(1, process.stderr, `chat.js: ${message}\npartial result: ${partial}\n`);
  }

  function clientError(message, turn) {
    result.errors.push({ source: 'client', code: null, message, turn });
  }

  // The deadline bounds the call on both ends; the timer is the backstop for
  // anything the deadline cannot cover (a connection that never settles, a
  // status that never arrives), a little later so the gRPC error wins normally.
  const deadline = new Date(Date.now() + opts.timeoutMs);
  const timer = setTimeout(
    () => fail(`timed out after ${opts.timeoutMs} ms`),
    opts.timeoutMs + 2000,
  );
  const call = client.Chat(opts.metadata, { deadline });

  function send(message) {
    if (streamOpen && !done) call.write(message);
  }

  function sendNextTurnOrEnd() {
    if (nextTurn < opts.turns.length) {
      const index = nextTurn++;
      pending = {
        turn: index + 1,
        text: '',
        deltas: 0,
        finish_reason: null,
        usage: null,
        request_id: null,
        logprobs: [],
      };
      result.turns.push(pending);
      send({ turn: { content: opts.turns[index] } });
    } else {
      sessionEnded = true;
      send({ end: {} });
      // Half-close too: a server that reads until EOF ends the stream either way.
      call.end();
    }
  }

  // The running turn is over (finished or rejected): check the cancel
  // expectation for the first turn and move on.
  function closeTurn() {
    const turn = pending;
    pending = null;
    if (opts.cancelAfter !== null && turn === result.turns[0]) {
      if (!cancelSent) {
        clientError(
          `turn ${turn.turn} ended after ${turn.deltas} deltas, before the cancel after ` +
            `${opts.cancelAfter} could be sent`,
          turn.turn,
        );
      } else if (turn.finish_reason !== 'FINISH_REASON_ABORT') {
        // The turn ended on its own before the cancel arrived; the server may
        // answer the cancel with an error, which must not end the next turn.
        staleCancel = true;
        clientError(
          `turn ${turn.turn} was cancelled but finished with ${turn.finish_reason}`,
          turn.turn,
        );
      }
    }
    sendNextTurnOrEnd();
  }

  call.on('data', (event) => {
    switch (event.event) {
      case 'turn_started':
        // "turn" stays the position in --turn: the server's numbering skips
        // rejected turns, so it can differ from what the caller asked for.
        if (pending) pending.request_id = event.turn_started.request_id;
        break;
      case 'delta':
        if (!pending) break;
        pending.text += event.delta.text;
        pending.deltas += 1;
        for (const lp of event.delta.logprobs) pending.logprobs.push(tokenLogprob(lp));
        if (
          opts.cancelAfter !== null &&
          pending === result.turns[0] &&
          !cancelSent &&
          pending.deltas >= opts.cancelAfter
        ) {
          cancelSent = true;
          send({ cancel: {} });
        }
        break;
      case 'turn_finished':
        if (!pending) break;
        pending.finish_reason = event.turn_finished.finish_reason;
        pending.usage = event.turn_finished.usage;
        lastFinishedTurn = event.turn_finished.turn;
        closeTurn();
        break;
      case 'error': {
        const err = event.error;
        result.errors.push({ source: 'server', code: err.code, message: err.message, turn: err.turn });
        // An error about an earlier turn, or the answer to a cancel that came
        // too late, says nothing about the running turn; any other error ends it.
        const aboutEarlierTurn = err.turn !== 0 && err.turn <= lastFinishedTurn;
        if (staleCancel && (aboutEarlierTurn || err.turn === 0)) {
          staleCancel = false;
        } else if (pending && !aboutEarlierTurn) {
          closeTurn();
        }
        break;
      }
      default:
        clientError(`unknown ChatEvent ${JSON.stringify(event)}`, pending ? pending.turn : 0);
    }
  });

  // A non-OK status arrives as 'error' (always followed by 'status').
  call.on('error', (err) => {
    streamOpen = false;
    const { code, details } = statusOf(err);
    fail(`gRPC error ${grpc.status[code] || code}: ${details}`);
  });

  // On success the stream ends ('end', after the last 'data') and the status
  // arrives; both are needed because 'status' may overtake queued 'data' events.
  function maybeSucceed() {
    if (!sawEnd || status === null || status.code !== grpc.status.OK) return;
    if (!sessionEnded) {
      // E.g. a session error (bad StartSession), which ends the stream.
      clientError(
        'the server ended the stream before the session was ended',
        pending ? pending.turn : 0,
      );
    }
    finish(0, process.stdout, `${JSON.stringify(result)}\n`);
  }
  call.on('end', () => {
    streamOpen = false;
    sawEnd = true;
    maybeSucceed();
  });
  call.on('status', (s) => {
    streamOpen = false;
    status = s;
    maybeSucceed();
  });

  const params = opts.maxTokens > 0 ? { max_tokens: opts.maxTokens } : {};
  if (opts.logprobs !== null) {
    params.return_logprobs = true;
    params.logprobs = opts.logprobs;
  }
  send({ start: { model: opts.model, params } });
  sendNextTurnOrEnd();
}

// The status to act on: a stream reset under the call (the mesh resets a call whose
// frontend died mid-response; HTTP/2 has no status for it, so gRPC reports INTERNAL
// "Received RST_STREAM ...") is UNAVAILABLE, retryable, as a server's own is.
function statusOf(err) {
  const details = err.details || err.message || '';
  if (err.code === grpc.status.INTERNAL && /RST_STREAM|Stream removed/.test(details)) {
    return { code: grpc.status.UNAVAILABLE,
             details: `the connection to the mesh broke mid-call (${details}); retry` };
  }
  return { code: err.code, details };
}

module.exports = { statusOf };

if (require.main === module) runSession(parseCli(process.argv.slice(2)));
