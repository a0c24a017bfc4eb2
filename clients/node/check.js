#!/usr/bin/env node
// Cross-language check: drives a running takumo-keys server from Node with
// @grpc/grpc-js, the contract loaded at run time from proto/ by
// @grpc/proto-loader (no generated code). VerifyKey goes over a channel that
// gzip-compresses requests; WatchKeyChanges is read as a server stream.
//
// Usage: check.js [--addr 127.0.0.1:PORT] [--token SERVICE_TOKEN] [--organization ORG]
//   (or TAKUMO_ADDR / TAKUMO_TOKEN in the environment; .ci/node-check sets
//   them, and NODE_PATH to the packages it installed under target/node-check)
//
// Prints one line per step and, last, `node check: N passed`; stops at the
// first failure (the steps build on each other) with `FAIL <step>: <why>`
// and exit status 1.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const CALL_TIMEOUT_MS = 10_000;
// From RevokeKey's response to the KeyChange naming the key.
const CHANGE_TIMEOUT_MS = 5_000;
const OVERALL_TIMEOUT_MS = 120_000;

function parseArgs(argv) {
  const args = {
    addr: process.env.TAKUMO_ADDR,
    token: process.env.TAKUMO_TOKEN,
    organization: 'node-check',
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const name = flag.replace(/^--/, '');
    if (!['addr', 'token', 'organization'].includes(name) || i + 1 >= argv.length) {
      usage(`unknown argument or missing value: ${flag}`);
    }
    args[name] = argv[++i];
  }
  if (!args.addr) usage('no server address: --addr or TAKUMO_ADDR');
  if (!args.token) usage('no service token: --token or TAKUMO_TOKEN');
  return args;
}

function usage(why) {
  console.error(`check.js: ${why}`);
  console.error('usage: check.js [--addr HOST:PORT] [--token SERVICE_TOKEN] [--organization ORG]');
  process.exit(2);
}

class CheckFailure extends Error {}

function assert(cond, message) {
  if (!cond) throw new CheckFailure(message);
}

function deadline(ms = CALL_TIMEOUT_MS) {
  return new Date(Date.now() + ms);
}

function statusName(code) {
  return grpc.status[code] ?? String(code);
}

function describeRpcError(method, err) {
  if (err && typeof err.code === 'number') {
    return `${method} failed with ${statusName(err.code)}: ${err.details || err.message}`;
  }
  return `${method} failed: ${err && err.stack ? err.stack : err}`;
}

function loadService() {
  const protoDir = path.resolve(__dirname, '..', '..', 'proto');
  const definition = protoLoader.loadSync('takumo/apikeys/v1/api_keys.proto', {
    keepCase: true, // field names as in the .proto (organization_id), like the other clients
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    // google/protobuf/{duration,field_mask,timestamp}.proto resolve from the
    // copies bundled with protobufjs; proto/ is the only include dir needed.
    includeDirs: [protoDir],
  });
  return grpc.loadPackageDefinition(definition).takumo.apikeys.v1.ApiKeyService;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const org = args.organization;
  const ApiKeyService = loadService();

  const client = new ApiKeyService(args.addr, grpc.credentials.createInsecure());
  // A channel of its own for VerifyKey, so that its first call is compressed
  // whatever the server answered on the other channel (grpc-js stops
  // compressing on a channel whose server does not list gzip in
  // grpc-accept-encoding). grpc-js ignores the level; it is set for parity
  // with grpc-core clients.
  const gzipClient = new ApiKeyService(args.addr, grpc.credentials.createInsecure(), {
    'grpc.default_compression_algorithm': 2, // gzip
    'grpc.default_compression_level': 2,
  });
  const clients = [client, gzipClient];

  const auth = () => {
    const md = new grpc.Metadata();
    md.set('authorization', `Bearer ${args.token}`);
    md.set('x-takumo-actor', 'alice');
    return md;
  };

  const unary = (c, method, request) =>
    new Promise((resolve, reject) => {
      c[method](request, auth(), { deadline: deadline() }, (err, response) => {
        if (err) reject(new CheckFailure(describeRpcError(method, err)));
        else resolve(response);
      });
    });

  let passed = 0;
  let current = 'start';
  const step = async (name, fn) => {
    current = name;
    const detail = await fn();
    passed++;
    console.log(`ok   ${name}${detail ? ` (${detail})` : ''}`);
  };

  const watchdog = setTimeout(() => {
    console.log(`FAIL ${current}: the check did not finish within ${OVERALL_TIMEOUT_MS / 1000} s`);
    process.exit(1);
  }, OVERALL_TIMEOUT_MS);
  watchdog.unref();

  try {
    await step(`connect to ${args.addr}`, async () => {
      await Promise.all(
        clients.map(
          (c) =>
            new Promise((resolve, reject) =>
              c.waitForReady(deadline(), (err) =>
                err ? reject(new CheckFailure(`channel not ready within ${CALL_TIMEOUT_MS / 1000} s: ${err.message}`)) : resolve(),
              ),
            ),
        ),
      );
    });

    const state = {};

    await step('CreateKey returns a live key shown once, created by the x-takumo-actor', async () => {
      const resp = await unary(client, 'CreateKey', {
        organization_id: org,
        name: 'node-client',
        preset: 'SCOPE_PRESET_READ_ONLY',
      });
      assert(typeof resp.secret === 'string' && resp.secret.startsWith('tk_live_'), `secret does not start with tk_live_: ${String(resp.secret).slice(0, 8)}…`);
      assert(resp.key && resp.key.id, `no key id in ${JSON.stringify(resp.key)}`);
      assert(resp.key.organization_id === org, `organization_id ${resp.key.organization_id}, want ${org}`);
      assert(resp.key.created_by === 'alice', `created_by ${resp.key.created_by}, want alice`);
      assert(resp.key.status === 'KEY_STATUS_ACTIVE', `status ${resp.key.status}`);
      assert(resp.secret.startsWith(resp.key.prefix), 'prefix is not the start of the key');
      state.id = resp.key.id;
      state.secret = resp.secret;
      return `id ${state.id}`;
    });

    await step('VerifyKey (gzip-compressed request) of the key is VALID', async () => {
      const resp = await unary(gzipClient, 'VerifyKey', { key: state.secret, required_scopes: ['fleet.read'] });
      assert(resp.valid === true, `valid ${resp.valid}, code ${resp.code}`);
      assert(resp.code === 'VERIFY_CODE_VALID', `code ${resp.code}`);
      assert(resp.key_id === state.id, `key_id ${resp.key_id}, want ${state.id}`);
      assert(resp.organization_id === org, `organization_id ${resp.organization_id}`);
      assert(resp.created_by === 'alice', `created_by ${resp.created_by}`);
    });

    await step('VerifyKey (gzip-compressed request) of a garbage key is not valid', async () => {
      const resp = await unary(gzipClient, 'VerifyKey', { key: 'tk_live_garbage-not-a-key' });
      assert(resp.valid === false, `valid ${resp.valid}, code ${resp.code}`);
      assert(resp.code === 'VERIFY_CODE_MALFORMED', `code ${resp.code}, want VERIFY_CODE_MALFORMED`);
      assert(resp.key_id === '', `key_id ${resp.key_id}, want none`);
      return resp.code;
    });

    await step('RollKey with a 60 s grace period returns a new key and the previous one', async () => {
      const resp = await unary(client, 'RollKey', { id: state.id, grace_period: { seconds: 60, nanos: 0 } });
      assert(resp.key && resp.key.id, `no new key in ${JSON.stringify(resp)}`);
      assert(resp.key.id !== state.id, `the new key has the old id ${state.id}`);
      assert(resp.secret.startsWith('tk_live_') && resp.secret !== state.secret, 'the new secret is not a new live key');
      assert(resp.key.rotated_from === state.id, `new key rotated_from ${resp.key.rotated_from}, want ${state.id}`);
      assert(resp.previous && resp.previous.id === state.id, `previous ${JSON.stringify(resp.previous)}, want id ${state.id}`);
      assert(resp.previous.rotated_to === resp.key.id, `previous rotated_to ${resp.previous.rotated_to}, want ${resp.key.id}`);
      assert(resp.previous.status === 'KEY_STATUS_ACTIVE', `previous status ${resp.previous.status}, want ACTIVE during the grace period`);
      state.newId = resp.key.id;
      state.newSecret = resp.secret;
      return `${state.id} -> ${state.newId}`;
    });

    await step('VerifyKey (gzip) of the new key is VALID', async () => {
      const resp = await unary(gzipClient, 'VerifyKey', { key: state.newSecret });
      assert(resp.valid === true && resp.code === 'VERIFY_CODE_VALID', `valid ${resp.valid}, code ${resp.code}`);
      assert(resp.key_id === state.newId, `key_id ${resp.key_id}, want ${state.newId}`);
    });

    // The stream, opened before the revoke. The server subscribes to its
    // change feed before it answers with response headers, so once the
    // headers (the 'metadata' event) are in, no change can be missed.
    const watch = client.WatchKeyChanges({ organization_id: org }, auth(), { deadline: deadline(60_000) });
    const seen = { changes: 0, resyncs: 0, others: 0 };
    const stream = { headers: null, status: null, error: null, waiters: [] };
    const wake = () => stream.waiters.splice(0).forEach((w) => w());
    const until = (cond, ms, what) =>
      new Promise((resolve, reject) => {
        const check = () => {
          if (cond()) return resolve(), true;
          if (stream.error) return reject(new CheckFailure(describeRpcError('WatchKeyChanges', stream.error) + ` (before ${what})`)), true;
          if (stream.status) return reject(new CheckFailure(`WatchKeyChanges ended with ${statusName(stream.status.code)} before ${what}`)), true;
          return false;
        };
        if (check()) return;
        const timer = setTimeout(() => reject(new CheckFailure(`no ${what} within ${ms / 1000} s`)), ms);
        stream.waiters.push(function again() {
          if (check()) clearTimeout(timer);
          else stream.waiters.push(again);
        });
      });
    watch.on('metadata', (md) => {
      stream.headers = md;
      wake();
    });
    watch.on('data', (change) => {
      if (change.resync) seen.resyncs++;
      else if (change.key_id === state.newId) seen.changes++;
      else seen.others++;
      wake();
    });
    watch.on('error', (err) => {
      stream.error = err;
      wake();
    });
    watch.on('status', (status) => {
      stream.status = status;
      wake();
    });

    await step(`WatchKeyChanges for ${org} is open`, () => until(() => stream.headers !== null, CALL_TIMEOUT_MS, 'response headers'));

    await step('RevokeKey of the new key revokes it', async () => {
      const key = await unary(client, 'RevokeKey', { id: state.newId });
      assert(key.id === state.newId && key.status === 'KEY_STATUS_REVOKED', `got ${key.id} ${key.status}`);
    });

    await step(`a KeyChange naming the revoked key arrives within ${CHANGE_TIMEOUT_MS / 1000} s`, async () => {
      const start = Date.now();
      try {
        await until(() => seen.changes > 0, CHANGE_TIMEOUT_MS, `KeyChange with key_id ${state.newId}`);
      } catch (err) {
        err.message += ` (the stream delivered ${seen.others} change(s) of other keys and ${seen.resyncs} resync(s))`;
        throw err;
      }
      return `after ${Date.now() - start} ms`;
    });

    await step('VerifyKey (gzip) of the revoked key is REVOKED', async () => {
      const resp = await unary(gzipClient, 'VerifyKey', { key: state.newSecret });
      assert(resp.valid === false && resp.code === 'VERIFY_CODE_REVOKED', `valid ${resp.valid}, code ${resp.code}`);
    });

    await step('WatchKeyChanges cancels cleanly', async () => {
      assert(!stream.error && !stream.status, `the stream ended before it was cancelled: ${describeRpcError('WatchKeyChanges', stream.error || stream.status)}`);
      watch.cancel();
      await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new CheckFailure('no status within 5 s of cancel()')), 5000);
        const done = () => {
          if (!stream.status) return stream.waiters.push(done);
          clearTimeout(timer);
          resolve();
        };
        done();
      });
      assert(stream.status.code === grpc.status.CANCELLED, `status ${statusName(stream.status.code)} after cancel, want CANCELLED`);
      return `${seen.changes} change(s) of the key, ${seen.resyncs} resync(s), ${seen.others} other change(s)`;
    });
  } catch (err) {
    const why = err instanceof CheckFailure ? err.message : err && err.stack ? err.stack : String(err);
    console.log(`FAIL ${current}: ${why}`);
    console.log(`node check: ${passed} passed, 1 failed`);
    clients.forEach((c) => c.close());
    process.exit(1);
  }

  clients.forEach((c) => c.close());
  clearTimeout(watchdog);
  console.log(`node check: ${passed} passed, 0 failed`);
  // Everything is closed: the process must now end by itself. If it does not,
  // something (a call, a channel) was left open.
  setTimeout(() => {
    console.log('FAIL shutdown: the process did not exit within 5 s of closing its channels');
    process.exit(1);
  }, 5000).unref();
}

process.on('unhandledRejection', (err) => {
  console.log(`FAIL unhandled rejection: ${err && err.stack ? err.stack : err}`);
  process.exit(1);
});

main();
