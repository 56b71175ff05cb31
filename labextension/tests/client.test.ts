/**
 * Unit tests of the comm client against a fake kernel connection that behaves like JupyterLab's
 * for the parts the client uses: comm targets, comm open/close, execute, status signals.
 * The real kernel side is tested in tests/test_comm.py and, end to end, in the browser test.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { LLMClient } from '../src/client';
import { COMM_TARGET, IState } from '../src/protocol';
import { RequestError } from '../src/requests';
import { FakeComm, FakeKernel, ids, STATE } from './fakes';

describe('LLMClient attaching', () => {
  it('registers the comm target and opens one comm with a hello on start', () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel, { refresh: 3 });
    assert.ok(kernel.targets.has(COMM_TARGET));
    assert.equal(kernel.opens.length, 1);
    assert.deepEqual(kernel.opens[0].opened[0], {
      kind: 'hello',
      protocol: 1,
      refresh: 3
    });
    assert.equal(client.status, 'connecting');
  });

  it('is attached with the state and aliases after the kernel says hello', () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel);
    const states: IState[] = [];
    client.stateChanged.connect((_, s) => states.push(s));
    kernel.opens[0].hello();
    assert.equal(client.status, 'attached');
    assert.deepEqual(client.state, STATE);
    assert.deepEqual(
      client.aliases.map(a => a.name),
      ['mistral']
    );
    assert.equal(client.kernelVersion, '0.1.0');
    assert.equal(states.length, 1);
  });

  it('says not-loaded when the kernel closes the open (no comm target) and does not retry on idle', () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel);
    kernel.opens[0].closeFromKernel();
    assert.equal(client.status, 'not-loaded');
    for (let i = 0; i < 5; i++) {
      kernel.setStatus('busy');
      kernel.setStatus('idle');
    }
    assert.equal(
      kernel.opens.length,
      1,
      'an open on every idle loops forever (NOTES §7)'
    );
  });

  it('waits for the websocket before opening', () => {
    const kernel = new FakeKernel();
    kernel.connectionStatus = 'connecting';
    const client = new LLMClient(kernel);
    assert.equal(kernel.opens.length, 0);
    kernel.setConnection('connected');
    assert.equal(kernel.opens.length, 1);
    kernel.opens[0].hello();
    assert.equal(client.status, 'attached');
  });

  it('adopts a comm the kernel opens itself, closing its own pending open', () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel);
    const own = kernel.opens[0];
    const fromKernel = kernel.openFromKernel({
      kind: 'hello',
      protocol: 1,
      version: '0.1.0',
      aliases: [],
      refresh: 2,
      state: STATE
    });
    assert.equal(client.status, 'attached');
    assert.ok(
      own.closed,
      'the redundant comm is closed so the kernel forgets its view'
    );
    assert.ok(!fromKernel.closed);
  });

  it('re-opens exactly once after a kernel restart', () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel);
    kernel.opens[0].hello();
    kernel.setStatus('restarting');
    assert.equal(client.status, 'restarting');
    kernel.setStatus('starting');
    kernel.setStatus('idle');
    assert.equal(kernel.opens.length, 2);
    kernel.opens[1].closeFromKernel(); // the new kernel has not loaded the extension
    assert.equal(client.status, 'not-loaded');
    kernel.setStatus('busy');
    kernel.setStatus('idle');
    assert.equal(kernel.opens.length, 2);
  });

  it('goes not-loaded when the kernel closes an attached comm (%unload_ext)', () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel);
    kernel.opens[0].hello();
    kernel.opens[0].closeFromKernel();
    assert.equal(client.status, 'not-loaded');
  });

  it('reports a dead kernel', () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel);
    kernel.setStatus('dead');
    assert.equal(client.status, 'dead');
  });
});

describe('LLMClient enabling', () => {
  it('runs %load_ext jupyter_llm and attaches to the comm the kernel then opens', async () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel);
    kernel.opens[0].closeFromKernel();
    const done = client.enable();
    assert.equal(client.status, 'enabling');
    assert.deepEqual(kernel.executed, ['%load_ext jupyter_llm']);
    kernel.openFromKernel({
      kind: 'hello',
      protocol: 1,
      version: '0.1.0',
      aliases: [],
      refresh: 2,
      state: STATE
    });
    await done;
    assert.equal(client.status, 'attached');
    assert.equal(
      kernel.opens.length,
      1,
      'no extra open once the kernel opened its comm'
    );
  });

  it('opens once more when the extension was already loaded (no comm comes)', async () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel);
    kernel.opens[0].closeFromKernel();
    await client.enable();
    assert.equal(kernel.opens.length, 2);
    kernel.opens[1].hello();
    assert.equal(client.status, 'attached');
  });

  it('keeps the kernel error when the extension cannot be imported', async () => {
    const kernel = new FakeKernel();
    kernel.executeResult.error = {
      ename: 'ModuleNotFoundError',
      evalue: "No module named 'jupyter_llm'"
    };
    const client = new LLMClient(kernel);
    kernel.opens[0].closeFromKernel();
    await client.enable();
    assert.equal(client.status, 'not-loaded');
    assert.match(
      client.lastError ?? '',
      /ModuleNotFoundError: No module named 'jupyter_llm'/
    );
  });
});

describe('LLMClient requests', () => {
  function attached(): {
    kernel: FakeKernel;
    client: LLMClient;
    comm: FakeComm;
  } {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel, { newId: ids() });
    const comm = kernel.opens[0];
    comm.hello();
    return { kernel, client, comm };
  }

  it('sends a request and resolves with the reply of the same id', async () => {
    const { client, comm } = attached();
    const pending = client.request('load', { name: 'smollm2' });
    assert.deepEqual(comm.sent.at(-1), {
      kind: 'request',
      id: 'r1',
      action: 'load',
      args: { name: 'smollm2' }
    });
    comm.receive({
      kind: 'reply',
      id: 'other-tab',
      ok: true,
      result: 'not mine'
    });
    comm.receive({
      kind: 'reply',
      id: 'r1',
      ok: true,
      result: { name: 'smollm2', pid: 7 }
    });
    assert.deepEqual(await pending, { name: 'smollm2', pid: 7 });
  });

  it('rejects with the kernel error type, message and details', async () => {
    const { client, comm } = attached();
    const pending = client.request('load', { name: 'big' });
    comm.receive({
      kind: 'reply',
      id: 'r1',
      ok: false,
      error: {
        type: 'WontFitError',
        message: 'big will not fit',
        estimate: { fits: false, devices: [] }
      }
    });
    await assert.rejects(pending, (e: RequestError) => {
      assert.equal(e.type, 'WontFitError');
      assert.equal(e.message, 'big will not fit');
      assert.deepEqual(e.details.estimate, { fits: false, devices: [] });
      return true;
    });
  });

  it('rejects pending requests when the kernel restarts', async () => {
    const { kernel, client } = attached();
    const pending = client.request('pull', { name: 'smollm2' });
    kernel.setStatus('restarting');
    await assert.rejects(pending, /pull: the kernel restarted/);
  });

  it('refuses requests while not attached', async () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel);
    await assert.rejects(
      client.request('unload', { name: 'x' }),
      /not loaded in this kernel/
    );
  });

  it('pushes states and notices from the kernel', () => {
    const { client, comm } = attached();
    const notices: unknown[] = [];
    client.noticed.connect((_, n) => notices.push(n));
    const next = {
      ...STATE,
      pulls: [
        { name: 'smollm2', status: 'downloading', completed: 5, total: 10 }
      ]
    };
    comm.receive({ kind: 'state', state: next });
    comm.receive({
      kind: 'event',
      event: { type: 'unloaded', name: 'smollm2', reason: 'keep_alive expired' }
    });
    assert.deepEqual(client.state, next);
    assert.deepEqual(notices, [
      { type: 'unloaded', name: 'smollm2', reason: 'keep_alive expired' }
    ]);
  });

  it('tells the kernel its refresh rate when the kernel uses another one', () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel, { refresh: 5, newId: ids() });
    const comm = kernel.openFromKernel({
      kind: 'hello',
      protocol: 1,
      version: '0.1.0',
      aliases: [],
      refresh: 2,
      state: STATE
    });
    assert.equal(client.status, 'attached');
    assert.deepEqual(comm.sent, [
      { kind: 'request', id: 'r1', action: 'configure', args: { refresh: 5 } }
    ]);
    client.setRefresh(0);
    assert.deepEqual(comm.sent.at(-1), {
      kind: 'request',
      id: 'r2',
      action: 'configure',
      args: { refresh: 0 }
    });
  });

  it('releases the request future when the reply comes', async () => {
    const { client, comm } = attached();
    const pending = client.request('state');
    comm.receive({ kind: 'reply', id: 'r1', ok: true, result: {} });
    await pending;
    assert.ok(comm.futures[0].disposed);
  });

  it('sends a request again on a fresh comm when the kernel could not take it', async () => {
    const { kernel, client, comm } = attached();
    const pending = client.request('serve', { port: 0 });
    comm.futures[0].refuse();
    assert.equal(client.status, 'connecting');
    assert.equal(kernel.opens.length, 2, 'a new comm is opened');
    assert.ok(
      !comm.closed,
      'the old comm stays open for replies already under way'
    );
    const fresh = kernel.opens[1];
    fresh.hello();
    assert.equal(client.status, 'attached');
    assert.deepEqual(fresh.sent.at(-1), {
      kind: 'request',
      id: 'r1',
      action: 'serve',
      args: { port: 0 }
    });
    fresh.receive({
      kind: 'reply',
      id: 'r1',
      ok: true,
      result: { running: true }
    });
    assert.deepEqual(await pending, { running: true });
  });

  it('rejects a request the kernel refuses twice', async () => {
    const { kernel, client, comm } = attached();
    const pending = client.request('unload', { name: 'smollm2' });
    comm.futures[0].refuse();
    kernel.opens[1].hello();
    kernel.opens[1].futures.at(-1)!.refuse('still gone');
    await assert.rejects(
      pending,
      (e: RequestError) =>
        e.type === 'UnknownSubshellError' && /still gone/.test(e.message)
    );
  });

  it('does not open a second comm when the kernel opened one during enable', async () => {
    const kernel = new FakeKernel();
    const client = new LLMClient(kernel);
    kernel.opens[0].closeFromKernel();
    const done = client.enable();
    // the kernel's comm opens at once; its hello comes later, from a thread
    const fromKernel = kernel.openFromKernel({ kind: 'opening', protocol: 1 });
    await done;
    assert.equal(kernel.opens.length, 1);
    fromKernel.hello();
    assert.equal(client.status, 'attached');
  });

  it('closes its own comm and forgets the target on dispose', () => {
    const { kernel, client, comm } = attached();
    client.dispose();
    assert.ok(comm.closed);
    assert.ok(!kernel.targets.has(COMM_TARGET));
    assert.equal(client.status, 'disposed');
  });
});
