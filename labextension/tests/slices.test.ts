/**
 * The panel redraws a section only when its slice of the state changed: states pushed through
 * a fake kernel into the real client, with renderers that count how often each section is drawn.
 */
import assert from 'node:assert/strict';
import { beforeEach, describe, it } from 'node:test';

import { LLMClient } from '../src/client';
import { IDevice, ILoadedModel, IState } from '../src/protocol';
import {
  ISectionInput,
  SECTION_NAMES,
  SectionName,
  SectionRedraw,
  SectionRenderers,
  slices
} from '../src/slices';
import {
  CPU,
  FakeComm,
  FakeKernel,
  GiB,
  MiB,
  STATE,
  loadedModel
} from './fakes';

const LOADED: ILoadedModel = loadedModel({
  measured: {
    CPU: {
      weights: 92 * MiB,
      kv: 90 * MiB,
      compute: 98 * MiB,
      output: 0,
      total: 280 * MiB
    }
  }
});

const ATTACHED: IState = { ...STATE, loaded: [LOADED], devices: [CPU] };

/** A client on a fake kernel whose states drive a redraw that counts what it draws. */
class Harness {
  constructor() {
    const renderers = {} as { [K in SectionName]: () => void };
    for (const name of SECTION_NAMES) {
      renderers[name] = () => {
        this.drawn[name] += 1;
      };
    }
    this.redraw = new SectionRedraw(renderers as SectionRenderers);
    this.client = new LLMClient(this.kernel);
    // as the panel does: every status change and every pushed state redraws what changed
    this.client.statusChanged.connect(() => this.update());
    this.client.stateChanged.connect(() => this.update());
    this.comm = this.kernel.opens[0];
    this.update(); // the panel draws itself once when it starts following a kernel
  }

  readonly kernel = new FakeKernel();
  readonly client: LLMClient;
  readonly comm: FakeComm;
  readonly redraw: SectionRedraw;
  readonly drawn = Object.fromEntries(SECTION_NAMES.map(n => [n, 0])) as {
    [K in SectionName]: number;
  };
  shown: string[] = [];
  busy = new Set<string>();

  update(): SectionName[] {
    return this.redraw.update(this.input());
  }

  input(): ISectionInput {
    const client = this.client;
    return {
      status: client.status,
      lastError: client.lastError,
      state: client.status === 'attached' ? client.state : null,
      shown: this.shown,
      busy: this.busy,
      aliases: client.aliases,
      now: 1000
    };
  }

  /** The kernel pushes a state. */
  push(state: IState): void {
    this.comm.receive({ kind: 'state', state });
  }

  /** Sections drawn since `before` (a copy of `drawn`). */
  since(before: { [K in SectionName]: number }): SectionName[] {
    return SECTION_NAMES.filter(n => this.drawn[n] !== before[n]);
  }
}

describe('SectionRedraw', () => {
  let t: Harness;
  beforeEach(() => {
    t = new Harness();
    t.comm.hello(ATTACHED);
  });

  it('draws every section first, then on hello only those with something new', () => {
    const fresh = new Harness();
    assert.deepEqual(
      SECTION_NAMES.map(n => fresh.drawn[n]),
      [1, 1, 1, 1, 1, 1, 1]
    );
    fresh.comm.hello(ATTACHED);
    assert.equal(fresh.client.status, 'attached');
    // no banner before or after; no pulls before or after
    assert.deepEqual(fresh.drawn, {
      banner: 1,
      devices: 2,
      loaded: 2,
      models: 2,
      pulls: 1,
      remotes: 1,
      server: 2
    });
  });

  it('redraws nothing when the same state is pushed again', () => {
    const before = { ...t.drawn };
    t.push(structuredClone(ATTACHED));
    t.push(structuredClone(ATTACHED));
    assert.deepEqual(t.since(before), []);
  });

  it('redraws only the pulls when a pull progresses', () => {
    const pull = {
      name: 'qwen',
      status: 'downloading',
      completed: 5,
      total: 10
    };
    t.push({ ...ATTACHED, pulls: [pull] });
    const before = { ...t.drawn };
    t.push({ ...ATTACHED, pulls: [{ ...pull, completed: 7 }] });
    assert.deepEqual(t.since(before), ['pulls']);
    assert.equal(
      t.drawn.loaded,
      before.loaded,
      'the loaded models were not redrawn'
    );
  });

  it('redraws the devices, not the loaded models, when free memory changes', () => {
    const before = { ...t.drawn };
    const cpu = { ...CPU, free_bytes: 19 * GiB, used_bytes: 5 * GiB };
    t.push({ ...ATTACHED, devices: [cpu] });
    assert.deepEqual(t.since(before), ['devices']);
  });

  it('redraws the loaded models and the devices they sit on when a model loads', () => {
    t.push({ ...ATTACHED, loaded: [] });
    const before = { ...t.drawn };
    t.push(ATTACHED);
    assert.deepEqual(t.since(before), ['devices', 'loaded', 'models']);
  });

  it('redraws the server alone when it starts', () => {
    const before = { ...t.drawn };
    t.push({
      ...ATTACHED,
      server: {
        running: true,
        url: 'http://127.0.0.1:11434',
        token: 't',
        requests: 0
      }
    });
    assert.deepEqual(t.since(before), ['server']);
  });

  it('redraws the remotes alone when a remote answers, and shows what it reports', () => {
    const remote = {
      name: 'big',
      url: 'http://127.0.0.1:8080',
      api: 'ollama',
      state: 'checking',
      models: [],
      running: []
    };
    t.push({ ...ATTACHED, remotes: [remote] });
    assert.equal(
      slices(t.input()).remotes[0].failed,
      false,
      'still being asked'
    );
    const before = { ...t.drawn };
    const model = { name: 'big/qwen', model: 'qwen', size: 2 * GiB };
    t.push({
      ...ATTACHED,
      remotes: [
        {
          ...remote,
          state: 'reachable',
          models: [model],
          running: [{ ...model, size: 3 * GiB, context_length: 4096 }]
        }
      ]
    });
    assert.deepEqual(t.since(before), ['remotes']);
    const row = slices(t.input()).remotes[0];
    assert.equal(row.failed, false);
    assert.deepEqual(row.models, [
      {
        name: 'big/qwen',
        caption: '2.00 GiB · loaded · 3.00 GiB in memory · ctx 4096'
      }
    ]);
    t.push({
      ...ATTACHED,
      remotes: [{ ...remote, state: 'unreachable', error: 'could not connect' }]
    });
    const dead = slices(t.input()).remotes[0];
    assert.equal(dead.failed, true);
    assert.match(dead.caption, /unreachable: could not connect/);
  });

  it('redraws the loaded models alone when an unload starts', () => {
    const before = { ...t.drawn };
    t.busy.add('unload:smollm2');
    assert.deepEqual(t.update(), ['loaded']);
    assert.deepEqual(t.since(before), ['loaded']);
  });

  it('redraws the state sections empty, and the banner, when the kernel closes the comm', () => {
    const before = { ...t.drawn };
    t.comm.closeFromKernel();
    assert.equal(t.client.status, 'not-loaded');
    // the pulls were empty and stay empty
    assert.deepEqual(t.since(before), [
      'banner',
      'devices',
      'loaded',
      'models',
      'server'
    ]);
    const after = { ...t.drawn };
    t.update();
    assert.deepEqual(
      t.since(after),
      [],
      'a detached panel does not redraw either'
    );
  });
});

describe('slices', () => {
  it('give each section what it shows and nothing else', () => {
    const input: ISectionInput = {
      status: 'attached',
      lastError: null,
      state: ATTACHED,
      shown: [],
      busy: new Set(),
      aliases: [],
      now: 0
    };
    const s = slices(input);
    assert.equal(s.banner, null);
    assert.deepEqual(
      s.devices?.map(d => d.segments.map(g => g.kind)),
      [['weights', 'kv', 'compute', 'other', 'free']]
    );
    assert.match(
      s.loaded![0].caption,
      /ctx 4096 · 0 GPU layers · KV f16 · pid 42 · kept loaded/
    );
    assert.deepEqual(
      s.models?.models.map(m => [m.name, m.disabled]),
      [['smollm2', true]]
    );
    assert.deepEqual(s.server, { running: false, error: null, busy: false });
  });

  it('hide the devices the settings leave out, from the device list and the model bars', () => {
    const gpu: IDevice = {
      ...CPU,
      id: 'GPU0',
      kind: 'gpu',
      name: 'L4',
      backend: 'CUDA0'
    };
    const state = { ...ATTACHED, devices: [CPU, gpu] };
    const base: Omit<ISectionInput, 'state' | 'shown'> = {
      status: 'attached',
      lastError: null,
      busy: new Set(),
      aliases: [],
      now: 0
    };
    const shown = slices({ ...base, state, shown: ['GPU0'] });
    assert.deepEqual(
      shown.devices?.map(d => d.id),
      ['GPU0']
    );
    assert.deepEqual(shown.loaded?.[0].shares, []);
  });
});
