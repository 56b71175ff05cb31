/** Unit tests of the pure drawing logic: sizes, bar segments, predicted against measured. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  compareModel,
  deviceSegments,
  estimateSegments,
  humanBytes,
  modelShares,
  parseEndpoints,
  parseOptions,
  percent,
  visibleDevices
} from '../src/memory';
import { IDevice, ILoadedModel } from '../src/protocol';
import { CPU, GiB, MiB, loadedModel } from './fakes';

const GPU: IDevice = {
  id: 'GPU0',
  kind: 'gpu',
  name: 'L4',
  total_bytes: 24 * GiB,
  free_bytes: 23 * GiB,
  used_bytes: 1 * GiB,
  backend: 'CUDA0'
};

function model(measured: ILoadedModel['measured']): ILoadedModel {
  return loadedModel({
    estimate: {
      fits: true,
      devices: [
        {
          device_id: 'CPU',
          weights: 92 * MiB,
          kv: 90 * MiB,
          compute: 98 * MiB,
          output: 0,
          total: 280 * MiB,
          free: 20 * GiB,
          fits: true
        }
      ]
    },
    measured
  });
}

/** A model offloaded to GPU0: estimated and measured per device, both keyed by device id. */
function gpuModel(): ILoadedModel {
  const sizes = (weights: number, kv: number, compute: number) => ({
    weights,
    kv,
    compute,
    output: 0,
    total: weights + kv + compute
  });
  return {
    ...model({
      CPU: sizes(31 * MiB, 0, 2 * MiB),
      GPU0: sizes(1 * GiB + 10 * MiB, 90 * MiB, 99 * MiB)
    }),
    options: {
      gpu_layers: 31,
      n_ctx: 4096,
      kv_type: 'f16',
      flash_attn: false,
      parallel: 1
    },
    estimate: {
      fits: true,
      devices: [
        {
          device_id: 'CPU',
          ...sizes(30 * MiB, 0, 2 * MiB),
          free: 20 * GiB,
          fits: true
        },
        {
          device_id: 'GPU0',
          ...sizes(1 * GiB, 90 * MiB, 98 * MiB),
          free: 23 * GiB,
          fits: true
        }
      ]
    }
  };
}

describe('humanBytes', () => {
  it('uses binary units like llama.cpp logs', () => {
    assert.equal(humanBytes(98362432), '93.8 MiB');
    assert.equal(humanBytes(512), '512 B');
    assert.equal(humanBytes(24 * GiB), '24.0 GiB');
    assert.equal(humanBytes(null), '?');
  });
});

describe('deviceSegments', () => {
  it('shows a loaded model by its measured buffers, the rest as other processes, then free', () => {
    const m = model({
      CPU: {
        weights: 92 * MiB,
        kv: 90 * MiB,
        compute: 98 * MiB,
        output: 1 * MiB,
        total: 281 * MiB
      }
    });
    const segs = deviceSegments(CPU, [m]);
    assert.deepEqual(
      segs.map(s => s.kind),
      ['weights', 'kv', 'compute', 'other', 'free']
    );
    assert.equal(
      segs[2].bytes,
      99 * MiB,
      'output buffers are drawn with the graph'
    );
    assert.equal(segs[3].bytes, 4 * GiB - 281 * MiB);
    assert.equal(segs[4].fraction, 20 / 24);
  });

  it('falls back to the estimate when nothing was measured', () => {
    const m = model({});
    assert.equal(deviceSegments(CPU, [m])[0].bytes, 92 * MiB);
  });

  it('finds measured buffers by the device id, the key the estimate uses too', () => {
    const m = gpuModel();
    assert.equal(deviceSegments(GPU, [m])[0].bytes, 1 * GiB + 10 * MiB);
    assert.equal(deviceSegments(CPU, [m])[0].bytes, 31 * MiB);
  });

  it('never draws a negative "other" when mmapped weights are not counted as used', () => {
    const tiny = { ...CPU, used_bytes: 10 * MiB };
    const segs = deviceSegments(tiny, [model({})]);
    assert.ok(!segs.some(s => s.kind === 'other'));
  });
});

describe('estimateSegments', () => {
  it('draws the need against the free memory', () => {
    const segs = estimateSegments({
      device_id: 'CPU',
      weights: 100,
      kv: 50,
      compute: 50,
      output: 0,
      total: 200,
      free: 1000,
      fits: true
    });
    assert.deepEqual(
      segs.map(s => s.kind),
      ['weights', 'kv', 'compute', 'free']
    );
    assert.equal(segs[3].bytes, 800);
  });

  it('marks what does not fit as over', () => {
    const segs = estimateSegments({
      device_id: 'GPU0',
      weights: 800,
      kv: 300,
      compute: 100,
      output: 0,
      total: 1200,
      free: 1000,
      fits: false
    });
    assert.equal(segs.at(-1)!.kind, 'over');
    assert.equal(segs.at(-1)!.bytes, 200);
    assert.ok(Math.abs(segs.reduce((s, x) => s + x.fraction, 0) - 1) < 1e-9);
  });
});

describe('compareModel', () => {
  it('pairs predicted and measured per device with the relative error', () => {
    const rows = compareModel(
      model({
        CPU: {
          weights: 92 * MiB,
          kv: 90 * MiB,
          compute: 98 * MiB,
          output: 0,
          total: 308 * MiB
        }
      })
    );
    assert.equal(rows.length, 1);
    assert.equal(rows[0].predicted, 280 * MiB);
    assert.equal(rows[0].measured, 308 * MiB);
    assert.ok(Math.abs(rows[0].error! - 0.1) < 1e-9);
  });

  it('gives a GPU0 model one row per device, predicted and measured side by side', () => {
    const rows = compareModel(gpuModel());
    assert.deepEqual(
      rows.map(r => r.device),
      ['CPU', 'GPU0']
    );
    const gpu = rows[1];
    assert.equal(gpu.predicted, 1 * GiB + 188 * MiB);
    assert.equal(gpu.measured, 1 * GiB + 199 * MiB);
    assert.ok(Math.abs(gpu.error! - (11 * MiB) / (1 * GiB + 188 * MiB)) < 1e-9);
    assert.ok(rows.every(r => r.predicted !== null && r.measured !== null));
  });

  it('keeps a device only one side knows as its own row', () => {
    const m = { ...gpuModel(), measured: {} };
    const rows = compareModel(m);
    assert.deepEqual(
      rows.map(r => [r.device, r.measured]),
      [
        ['CPU', null],
        ['GPU0', null]
      ]
    );
  });
});

describe('modelShares', () => {
  it('splits what a model holds on each device into weights, KV and graph', () => {
    const shares = modelShares(gpuModel(), [CPU, GPU]);
    assert.deepEqual(
      shares.map(s => s.device),
      ['CPU', 'GPU0']
    );
    assert.equal(shares[1].held, 1 * GiB + 199 * MiB);
    assert.deepEqual(
      shares[1].segments.map(s => s.kind),
      ['weights', 'kv', 'compute']
    );
    assert.ok(
      Math.abs(shares[1].segments.reduce((t, s) => t + s.fraction, 0) - 1) <
        1e-9
    );
  });
});

describe('percent', () => {
  it('signs the relative error and leaves unknowns blank', () => {
    assert.equal(percent(0.005), '+0.5%');
    assert.equal(percent(-0.1234), '-12.3%');
    assert.equal(percent(null), '');
  });
});

describe('parseOptions', () => {
  const form = {
    gpuLayers: 'auto',
    context: '4096',
    kvType: 'q8_0',
    flashAttn: true,
    parallel: '2'
  };
  it('turns the form into load options', () => {
    assert.deepEqual(parseOptions(form), {
      gpu_layers: 'auto',
      n_ctx: 4096,
      kv_type: 'q8_0',
      flash_attn: true,
      parallel: 2
    });
  });
  it('says what to type instead of a bad value', () => {
    assert.match(
      parseOptions({ ...form, context: '8' }) as string,
      /context: give a whole number ≥ 16/
    );
    assert.match(
      parseOptions({ ...form, gpuLayers: '-1' }) as string,
      /GPU layers/
    );
    assert.match(
      parseOptions({ ...form, parallel: '0' }) as string,
      /parallel/
    );
  });
  it('sends rpc-servers only when some are given', () => {
    assert.equal(
      'rpc' in (parseOptions({ ...form, rpc: ' , ' }) as object),
      false
    );
    assert.deepEqual(
      (parseOptions({ ...form, rpc: '127.0.0.1:50052' }) as { rpc: string[] })
        .rpc,
      ['127.0.0.1:50052']
    );
    assert.match(
      parseOptions({ ...form, rpc: '127.0.0.1' }) as string,
      /RPC servers: "127.0.0.1" is not HOST:PORT/
    );
  });
});

describe('parseEndpoints', () => {
  it('normalises like the kernel: trimmed, host lower-cased, each once', () => {
    assert.deepEqual(
      parseEndpoints(' GPU-Box:50052, 10.0.0.2:2,gpu-box:50052 '),
      ['gpu-box:50052', '10.0.0.2:2']
    );
    assert.deepEqual(parseEndpoints(''), []);
  });
  it('names the endpoint that is wrong and what to type', () => {
    for (const [bad, says] of [
      ['no-port', /"no-port" is not HOST:PORT, e.g. 192.168.1.20:50052/],
      [':50052', /is not HOST:PORT/],
      ['host:port', /is not HOST:PORT/],
      ['my host:1', /is not HOST:PORT/],
      ['host:0', /port 0 is outside 1-65535/],
      ['host:70000', /port 70000 is outside 1-65535/],
      ['::1:50052', /no IPv6 addresses/],
      ['[::1]:50052', /no IPv6 addresses/]
    ] as [string, RegExp][]) {
      assert.match(parseEndpoints(bad) as string, says, bad);
    }
    const many = Array.from({ length: 17 }, (_, i) => `h:${i + 1}`).join(',');
    assert.match(parseEndpoints(many) as string, /at most 16, not 17/);
  });
});

describe('visibleDevices', () => {
  it('shows all devices by default and the chosen ones otherwise', () => {
    assert.equal(visibleDevices([CPU, GPU], []).length, 2);
    assert.deepEqual(
      visibleDevices([CPU, GPU], ['CUDA0']).map(d => d.id),
      ['GPU0']
    );
  });
});
