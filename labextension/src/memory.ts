/**
 * Pure functions from the kernel's state to what the panel draws: byte sizes, the segments of
 * a device's stacked bar and of a loaded model's share of each device, predicted-against-measured
 * rows per loaded model, and load options typed into the form. No DOM here, so all of it is
 * unit-tested in node.
 */
import {
  IBufferSizes,
  IDevice,
  IEstimate,
  IEstimateRow,
  ILoadedModel,
  ILoadOptions
} from './protocol';

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

/** `98362432` → `"93.8 MiB"` (binary units, as llama.cpp logs them). */
export function humanBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !Number.isFinite(n)) {
    return '?';
  }
  let value = Math.abs(n);
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 ? 0 : value < 10 ? 2 : value < 100 ? 1 : 0;
  return `${n < 0 ? '-' : ''}${value.toFixed(digits)} ${UNITS[unit]}`;
}

/** What a segment of a stacked bar stands for; also its CSS modifier class. */
export type SegmentKind =
  'weights' | 'kv' | 'compute' | 'other' | 'free' | 'over';

export interface ISegment {
  kind: SegmentKind;
  bytes: number;
  /** Share of the bar's width, 0..1. */
  fraction: number;
  /** Tooltip text. */
  label: string;
}

export const SEGMENT_LABELS: { [K in SegmentKind]: string } = {
  weights: 'weights',
  kv: 'KV cache',
  compute: 'compute graph',
  other: 'other processes',
  free: 'free',
  over: 'missing'
};

/**
 * The bytes one loaded model holds on a device: measured when known, else its estimate. The
 * kernel keys both by the device's id ("CPU", "GPU0"), so one key finds either.
 */
export function modelOnDevice(
  model: ILoadedModel,
  device: IDevice
): IBufferSizes | null {
  const measured = model.measured?.[device.id];
  if (measured !== undefined) {
    return measured;
  }
  const row = (model.estimate?.devices ?? []).find(
    r => r.device_id === device.id
  );
  return row ?? null;
}

/** `label` is the whole tooltip; by default the kind and the size. */
function segment(
  kind: SegmentKind,
  bytes: number,
  total: number,
  label?: string
): ISegment {
  const fraction = total > 0 ? Math.max(0, Math.min(1, bytes / total)) : 0;
  return {
    kind,
    bytes,
    fraction,
    label: label ?? `${SEGMENT_LABELS[kind]}: ${humanBytes(bytes)}`
  };
}

/**
 * A device's bar: for each loaded model its weights, KV and graph (output buffers count as
 * graph), then what other processes use, then free memory; widths relative to the device total.
 */
export function deviceSegments(
  device: IDevice,
  loaded: ILoadedModel[]
): ISegment[] {
  const total = device.total_bytes;
  const segments: ISegment[] = [];
  let ours = 0;
  for (const model of loaded) {
    const sizes = modelOnDevice(model, device);
    if (sizes === null) {
      continue;
    }
    const compute = sizes.compute + sizes.output;
    segments.push(
      segment(
        'weights',
        sizes.weights,
        total,
        `${model.name} weights: ${humanBytes(sizes.weights)}`
      )
    );
    segments.push(
      segment(
        'kv',
        sizes.kv,
        total,
        `${model.name} KV cache: ${humanBytes(sizes.kv)}`
      )
    );
    segments.push(
      segment(
        'compute',
        compute,
        total,
        `${model.name} compute graph: ${humanBytes(compute)}`
      )
    );
    ours += sizes.weights + sizes.kv + compute;
  }
  // mmapped weights may count as page cache, not "used": never draw a negative remainder
  const other = Math.max(0, device.used_bytes - ours);
  segments.push(segment('other', other, total));
  segments.push(segment('free', Math.max(0, device.free_bytes), total));
  return segments.filter(s => s.bytes > 0 || s.kind === 'free');
}

/** What one loaded model holds on one device, for the bar on its card. */
export interface IModelShare {
  device: string;
  /** Bytes the model holds there in all. */
  held: number;
  /** Weights, KV and graph as shares of `held`. */
  segments: ISegment[];
}

/** One share per device the model uses: weights / KV / graph as parts of what it holds there. */
export function modelShares(
  model: ILoadedModel,
  devices: IDevice[]
): IModelShare[] {
  const shares: IModelShare[] = [];
  for (const device of devices) {
    const segments = deviceSegments(device, [model]).filter(
      s => s.kind !== 'other' && s.kind !== 'free'
    );
    if (segments.length > 0) {
      const held = segments.reduce((sum, s) => sum + s.bytes, 0);
      shares.push({
        device: device.id,
        held,
        segments: segments.map(s => ({
          ...s,
          fraction: held > 0 ? s.bytes / held : 0
        }))
      });
    }
  }
  return shares;
}

/**
 * An estimate row as a bar: weights, KV and graph against what is free on the device. When it
 * does not fit, the part beyond the free memory is drawn as an `over` segment.
 */
export function estimateSegments(row: IEstimateRow): ISegment[] {
  const needed = row.weights + row.kv + row.compute + row.output;
  const free = Math.max(0, row.free ?? needed);
  const scale = Math.max(free, needed);
  // fill the free memory in load order; whatever is left over is drawn as missing
  let room = free;
  const segments: ISegment[] = [];
  for (const [kind, bytes] of [
    ['weights', row.weights],
    ['kv', row.kv],
    ['compute', row.compute + row.output]
  ] as [SegmentKind, number][]) {
    const drawn = Math.min(bytes, room);
    room -= drawn;
    segments.push(
      segment(
        kind,
        drawn,
        scale,
        `${SEGMENT_LABELS[kind]}: ${humanBytes(bytes)}`
      )
    );
  }
  if (needed < free) {
    segments.push(
      segment(
        'free',
        free - needed,
        scale,
        `still free: ${humanBytes(free - needed)}`
      )
    );
  } else if (needed > free) {
    segments.push(
      segment(
        'over',
        needed - free,
        scale,
        `missing: ${humanBytes(needed - free)} more than is free`
      )
    );
  }
  return segments.filter(s => s.bytes > 0);
}

/** One device of a loaded model: what the estimate said and what llama.cpp reported. */
export interface IComparisonRow {
  device: string;
  predicted: number | null;
  measured: number | null;
  /** (measured - predicted) / predicted, when both are known. */
  error: number | null;
}

/** Predicted against measured totals per device for one loaded model. */
export function compareModel(model: ILoadedModel): IComparisonRow[] {
  const rows = new Map<string, IComparisonRow>();
  for (const est of model.estimate?.devices ?? []) {
    if (est.total > 0) {
      rows.set(est.device_id, {
        device: est.device_id,
        predicted: est.total,
        measured: null,
        error: null
      });
    }
  }
  for (const [key, sizes] of Object.entries(model.measured ?? {})) {
    // measured and estimated rows are keyed alike ("CPU", "GPU0"): one row per device
    const row = rows.get(key) ?? {
      device: key,
      predicted: null,
      measured: null,
      error: null
    };
    row.measured = sizes.total;
    if (row.predicted) {
      row.error = (sizes.total - row.predicted) / row.predicted;
    }
    rows.set(key, row);
  }
  return [...rows.values()];
}

/** "+1.2%" for a relative error. */
export function percent(error: number | null): string {
  if (error === null || !Number.isFinite(error)) {
    return '';
  }
  const value = (error * 100).toFixed(1);
  return `${error >= 0 ? '+' : ''}${value}%`;
}

/** What the load form holds, as typed. */
export interface IOptionsForm {
  gpuLayers: string;
  context: string;
  kvType: string;
  flashAttn: boolean;
  parallel: string;
  /** llama.cpp rpc-servers, `host:port` separated by commas; empty or absent: none. */
  rpc?: string;
}

/** At most this many rpc-servers (llama.cpp's GGML_RPC_MAX_SERVERS). */
export const MAX_RPC_SERVERS = 16;

/**
 * `"a:1, B:2"` → `["a:1", "b:2"]`, or a message that says what to type instead. The same rules
 * as the kernel's parser (jupyter_llm/memory/rpc_endpoints.py), so a bad endpoint is named here
 * before any request; llama.cpp splits an endpoint at its first colon, so no IPv6 addresses.
 */
export function parseEndpoints(text: string): string[] | string {
  const found: string[] = [];
  for (const item of text.split(',')) {
    const value = item.trim();
    if (value === '') {
      continue;
    }
    const usage = `RPC servers: "${value}" is not HOST:PORT, e.g. 192.168.1.20:50052`;
    const colon = value.lastIndexOf(':');
    const host = value.slice(0, Math.max(colon, 0));
    const port = value.slice(colon + 1);
    if (colon < 0 || host === '' || !/^\d+$/.test(port) || /\s/.test(host)) {
      return usage;
    }
    if (host.includes(':') || host.startsWith('[')) {
      return `${usage} (llama.cpp's RPC backend takes no IPv6 addresses)`;
    }
    const number = Number(port);
    if (number < 1 || number > 65535) {
      return `${usage} (port ${number} is outside 1-65535)`;
    }
    const endpoint = `${host.toLowerCase()}:${number}`;
    if (!found.includes(endpoint)) {
      found.push(endpoint);
    }
  }
  if (found.length > MAX_RPC_SERVERS) {
    return `RPC servers: at most ${MAX_RPC_SERVERS}, not ${found.length}`;
  }
  return found;
}

/** Form text → load options, or an error message that says what to type instead. */
export function parseOptions(form: IOptionsForm): ILoadOptions | string {
  const whole = (
    text: string,
    min: number,
    what: string
  ): number | 'auto' | string => {
    const t = text.trim().toLowerCase();
    if (t === '' || t === 'auto') {
      return 'auto';
    }
    if (!/^\d+$/.test(t) || Number(t) < min) {
      return `${what}: give a whole number ≥ ${min}, or auto`;
    }
    return Number(t);
  };
  const gpuLayers = whole(form.gpuLayers, 0, 'GPU layers');
  if (typeof gpuLayers === 'string' && gpuLayers !== 'auto') {
    return gpuLayers;
  }
  const context = whole(form.context, 16, 'context');
  if (typeof context === 'string' && context !== 'auto') {
    return context;
  }
  const parallel = Number(form.parallel.trim() || '1');
  if (!Number.isInteger(parallel) || parallel < 1 || parallel > 64) {
    return 'parallel slots: give a whole number from 1 to 64';
  }
  if (!['f16', 'q8_0', 'q4_0'].includes(form.kvType)) {
    return 'KV type: choose f16, q8_0 or q4_0';
  }
  const rpc = parseEndpoints(form.rpc ?? '');
  if (typeof rpc === 'string') {
    return rpc;
  }
  const options: ILoadOptions = {
    gpu_layers: gpuLayers as number | 'auto',
    n_ctx: context as number | 'auto',
    kv_type: form.kvType as ILoadOptions['kv_type'],
    flash_attn: form.flashAttn,
    parallel
  };
  // none: the request stays as it was before rpc-servers (the kernel's default is none)
  return rpc.length > 0 ? { ...options, rpc } : options;
}

/**
 * Devices the settings ask to show (an empty list shows all). The user may name a device by its
 * id or by the llama.cpp backend name the kernel reports for it ("GPU0" or "CUDA0").
 */
export function visibleDevices(devices: IDevice[], shown: string[]): IDevice[] {
  const valid = devices.filter(d => !d.error);
  if (shown.length === 0) {
    return valid;
  }
  return valid.filter(
    d => shown.includes(d.id) || (!!d.backend && shown.includes(d.backend))
  );
}

/** "unloads in 4 min" / "kept loaded" for a model's expiry. */
export function expiry(
  model: ILoadedModel,
  now: number = Date.now() / 1000
): string {
  if (model.expires_at === null || model.expires_at === undefined) {
    return 'kept loaded';
  }
  if (model.active > 0) {
    return 'busy';
  }
  const left = Math.max(0, model.expires_at - now);
  if (left < 90) {
    return `unloads in ${Math.round(left)} s`;
  }
  return `unloads in ${Math.round(left / 60)} min`;
}

/** Whether an estimate says the load will fit (no rows: unknown, treated as fitting). */
export function fits(estimate: IEstimate | null | undefined): boolean {
  return estimate ? estimate.fits : true;
}
