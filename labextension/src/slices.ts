/**
 * What each section of the panel draws, as plain data taken from the kernel's state (its
 * "slice"), and the redraw rule: a section is drawn again only when its slice changed since it
 * was last drawn. A slice holds exactly what its section shows (no more, so an unrelated change
 * such as a device's free memory does not redraw the loaded models; no less, so nothing shown
 * goes stale). No DOM here: node tests count the redraws.
 */
import type { ClientStatus } from './client';
import {
  compareModel,
  deviceSegments,
  expiry,
  humanBytes,
  IComparisonRow,
  IModelShare,
  ISegment,
  modelShares,
  visibleDevices
} from './memory';
import { IAlias, IRemoteState, IState } from './protocol';

/** Everything the sections are drawn from: the state and the panel's own inputs. */
export interface ISectionInput {
  /** The client's status, or `none` when no notebook kernel is followed. */
  status: ClientStatus | 'none';
  /** Why enabling the extension failed, when it did. */
  lastError: string | null;
  /** The kernel's state while attached, else null. */
  state: IState | null;
  /** Device ids the settings show (empty: all). */
  shown: string[];
  /** Actions under way, by key: `load:NAME`, `unload:NAME`, `serve`… */
  busy: ReadonlySet<string>;
  /** Names the kernel can pull (its alias table). */
  aliases: IAlias[];
  /** Seconds since the epoch (a loaded model's expiry is shown relative to it). */
  now: number;
}

/** The "load jupyter_llm in this kernel" banner. */
export interface IBannerSlice {
  enabling: boolean;
  error: string | null;
}

/** A device's row: its memory and the stacked bar of what uses it. */
export interface IDeviceSlice {
  id: string;
  name: string;
  total: number;
  free: number;
  segments: ISegment[];
}

/** A loaded model's card. */
export interface ILoadedSlice {
  name: string;
  caption: string;
  /** An unload of it is under way. */
  busy: boolean;
  shares: IModelShare[];
  comparison: IComparisonRow[];
}

/** A cached model's row. */
export interface ICachedSlice {
  name: string;
  /** Its first file (the row's tooltip). */
  file: string;
  caption: string;
  /** Loaded already, or a load of it is under way. */
  disabled: boolean;
}

/** The cached models, and the names the load form suggests (cached models, then aliases). */
export interface IModelsSlice {
  models: ICachedSlice[];
  aliases: IAlias[];
}

/** A pull under way. */
export interface IPullSlice {
  name: string;
  caption: string;
  completed: number;
  /** Bytes in all; null until known (the bar is then indeterminate). */
  total: number | null;
}

/** A remote engine's row: its state, and a line per model (loaded ones with what it reports). */
export interface IRemoteSlice {
  name: string;
  caption: string;
  /** It could not be reached or answered an error (not while it is still being asked). */
  failed: boolean;
  models: { name: string; caption: string }[];
}

/** The API server: running, or not (with its last error). */
export type ServerSlice =
  | { running: true; url: string; token: string; requests: number }
  | { running: false; error: string | null; busy: boolean };

/** Every section's slice; null draws the section empty (or hides the banner). */
export interface ISlices {
  banner: IBannerSlice | null;
  devices: IDeviceSlice[] | null;
  loaded: ILoadedSlice[] | null;
  models: IModelsSlice | null;
  pulls: IPullSlice[];
  remotes: IRemoteSlice[];
  server: ServerSlice | null;
}

export type SectionName = keyof ISlices;

/** The sections in the order they are drawn. */
export const SECTION_NAMES: readonly SectionName[] = [
  'banner',
  'devices',
  'loaded',
  'models',
  'pulls',
  'remotes',
  'server'
];

/** Draws one section from its slice alone. */
export type SectionRenderers = {
  [K in SectionName]: (slice: ISlices[K]) => void;
};

/** The slice of every section. */
export function slices(input: ISectionInput): ISlices {
  const { state, busy } = input;
  const banner =
    input.status === 'not-loaded' || input.status === 'enabling'
      ? {
          enabling: input.status === 'enabling',
          error: input.lastError || null
        }
      : null;
  if (state === null) {
    return {
      banner,
      devices: null,
      loaded: null,
      models: null,
      pulls: [],
      remotes: [],
      server: null
    };
  }
  const visible = visibleDevices(state.devices, input.shown);
  const loadedNames = new Set(state.loaded.map(m => m.name));
  const server = state.server;
  return {
    banner,
    devices: visible.map(device => ({
      id: device.id,
      name: device.name,
      total: device.total_bytes,
      free: device.free_bytes,
      segments: deviceSegments(device, state.loaded)
    })),
    loaded: state.loaded.map(model => {
      const o = model.options;
      return {
        name: model.name,
        caption:
          `ctx ${model.n_ctx ?? o.n_ctx} · ${o.gpu_layers} GPU layers · KV ${o.kv_type}` +
          ` · pid ${model.pid} · ${expiry(model, input.now)}`,
        busy: busy.has(`unload:${model.name}`),
        shares: modelShares(model, visible),
        comparison: compareModel(model)
      };
    }),
    models: {
      models: state.models.map(record => {
        const summary = record.summary ?? {};
        return {
          name: record.name,
          file: record.files[0] ?? '',
          caption: [
            humanBytes(record.size),
            summary.quantization,
            summary.architecture,
            record.source
          ]
            .filter(Boolean)
            .join(' · '),
          disabled:
            loadedNames.has(record.name) || busy.has(`load:${record.name}`)
        };
      }),
      aliases: input.aliases
    },
    pulls: state.pulls.map(pull => {
      const amount = pull.total
        ? `${humanBytes(pull.completed)} / ${humanBytes(pull.total)}`
        : '';
      return {
        name: pull.name,
        caption: `${pull.name}: ${pull.status} ${amount}`,
        completed: pull.completed,
        total: pull.total ?? null
      };
    }),
    remotes: (state.remotes ?? []).map(remoteSlice),
    server: server?.running
      ? {
          running: true,
          url: server.url,
          token: server.token ?? '',
          requests: server.requests ?? 0
        }
      : {
          running: false,
          error: server?.error ?? null,
          busy: busy.has('serve')
        }
  };
}

/** A remote's row; what it did not report is left out (unknown, never shown as zero). */
export function remoteSlice(remote: IRemoteState): IRemoteSlice {
  const running = new Map(remote.running.map(r => [r.name, r]));
  // what happened, not what to do about it: `%llm remote list` says that
  const problem = remote.error ? `: ${remote.error.split('; ')[0]}` : '';
  return {
    name: remote.name,
    caption: `${remote.url} · ${remote.api} · ${remote.state}${problem}`,
    failed: remote.state === 'unreachable' || remote.state === 'error',
    models: remote.models.map(model => {
      const loaded = running.get(model.name);
      const parts = [model.size ? humanBytes(model.size) : ''];
      if (loaded) {
        parts.push(
          'loaded',
          loaded.size ? `${humanBytes(loaded.size)} in memory` : '',
          loaded.context_length ? `ctx ${loaded.context_length}` : ''
        );
      }
      return { name: model.name, caption: parts.filter(Boolean).join(' · ') };
    })
  };
}

/** Redraws a section only when its slice changed (compared as JSON) since it last drew it. */
export class SectionRedraw {
  constructor(private readonly _renderers: SectionRenderers) {}

  /** Draw every section whose slice differs from the one it shows; returns their names. */
  update(input: ISectionInput): SectionName[] {
    const next = slices(input);
    const drawn: SectionName[] = [];
    for (const name of SECTION_NAMES) {
      const key = JSON.stringify(next[name]);
      if (this._keys.get(name) !== key) {
        this._draw(name, next);
        this._keys.set(name, key); // after drawing: a section that failed to draw is tried again
        drawn.push(name);
      }
    }
    return drawn;
  }

  private _draw<K extends SectionName>(name: K, next: ISlices): void {
    this._renderers[name](next[name]);
  }

  private _keys = new Map<SectionName, string>();
}
