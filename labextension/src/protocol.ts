/**
 * The messages exchanged over the comm target `jupyter_llm` and the state they carry.
 *
 * The kernel's model manager owns all state; `State` is its `snapshot()` as JSON. The kernel
 * pushes the whole snapshot (batched to a few per second); the panel sends requests and gets
 * exactly one reply per request id. Kept in sync with jupyter_llm/notebook/comm.py.
 */

/** The comm target name registered by the kernel (jupyter_llm/notebook/comm.py, TARGET). */
export const COMM_TARGET = 'jupyter_llm';

/** Protocol version; the kernel sends its own in `hello`. */
export const PROTOCOL_VERSION = 1;

/**
 * Seconds between the kernel's periodic device refreshes unless the settings say otherwise
 * (0: only on events). schema/plugin.json restates it as `refreshRate`'s default, since JSON
 * cannot import; a unit test keeps the two equal.
 */
export const DEFAULT_REFRESH_SECONDS = 2;

/** Bytes a model holds on one device, by purpose (llama.cpp's own accounting). */
export interface IBufferSizes {
  weights: number;
  kv: number;
  compute: number;
  output: number;
  total: number;
}

/** One row of a memory estimate: what loading would take on a device and whether it fits. */
export interface IEstimateRow extends IBufferSizes {
  device_id: string;
  /** Free bytes now; null when unknown. */
  free: number | null;
  fits: boolean;
  /** Bytes kept free for safety. */
  margin?: number;
}

/** A memory estimate in the shape jupyter_llm.memory.estimate.MemoryEstimate.to_dict() gives. */
export interface IEstimate {
  model?: string;
  /** The options the estimate assumed ("auto" resolved). */
  options?: ILoadOptions;
  n_ctx?: number;
  devices: IEstimateRow[];
  fits: boolean;
  total?: number;
  exact?: boolean;
  source?: string;
  notes?: string[];
  suggestion?: string | null;
  /** What the user must know before loading (an rpc-server outside private networks). */
  warnings?: string[];
}

export interface IDevice {
  id: string;
  kind: 'cpu' | 'gpu';
  name: string;
  total_bytes: number;
  free_bytes: number;
  used_bytes: number;
  backend?: string | null;
  processes?: [number, number][];
  error?: string;
}

export interface IModelRecord {
  name: string;
  source: string;
  files: string[];
  sha256?: string | null;
  size: number;
  summary?: {
    architecture?: string;
    parameters?: number;
    quantization?: string;
    context_length?: number;
    layers?: number;
    model_name?: string;
  };
}

export interface ILoadOptions {
  gpu_layers: number | 'auto';
  n_ctx: number | 'auto';
  kv_type: 'f16' | 'q8_0' | 'q4_0';
  flash_attn: boolean;
  parallel: number;
  threads?: number | null;
  keep_alive?: number | null;
  /** llama.cpp rpc-servers (`host:port`) whose devices take layers like GPUs. */
  rpc?: string[];
}

export interface ILoadedModel {
  name: string;
  size: number;
  sha256?: string | null;
  options: ILoadOptions;
  n_ctx?: number | null;
  pid: number;
  loaded_at: number;
  expires_at?: number | null;
  active: number;
  estimate?: IEstimate | null;
  measured: { [device: string]: IBufferSizes };
}

export interface IPullProgress {
  name: string;
  status: string;
  filename?: string | null;
  total?: number | null;
  completed: number;
  message?: string | null;
}

/** The API server's status (jupyter_llm.server Server.status()); null when not started. */
export interface IServerStatus {
  running: boolean;
  url: string;
  openai_base_url?: string;
  host?: string;
  port?: number;
  auth?: boolean;
  token?: string | null;
  parallel?: number;
  requests?: number;
  error?: string | null;
}

/** A remote engine's model, as ``NAME/MODEL``; sizes it did not report are null. */
export interface IRemoteModel {
  name: string;
  model: string;
  size?: number | null;
  context_length?: number | null;
}

/** A remote engine (jupyter_llm.remote Remotes.snapshot()): its address, state and models. */
export interface IRemoteState {
  name: string;
  url: string;
  api: string;
  /** reachable, unreachable, error, checking or unknown (not asked yet). */
  state: string;
  error?: string | null;
  models: IRemoteModel[];
  /** What it reports as loaded (Ollama's /api/ps, llama-server's /props and /slots). */
  running: IRemoteModel[];
}

/** The manager's snapshot. */
export interface IState {
  models: IModelRecord[];
  loaded: ILoadedModel[];
  pulls: IPullProgress[];
  devices: IDevice[];
  server: IServerStatus | null;
  /** Absent from kernels older than remote engines. */
  remotes?: IRemoteState[];
}

export interface IAlias {
  name: string;
  description: string;
}

/** A manager event worth showing to the user (load failures, evictions…). */
export interface INotice {
  type: string;
  name?: string;
  reason?: string;
  error?: string;
  [key: string]: unknown;
}

/** Kernel → panel. */
export type KernelMessage =
  | {
      kind: 'hello';
      protocol: number;
      version: string;
      aliases: IAlias[];
      /** Seconds between periodic device refreshes the kernel uses now. */
      refresh: number;
      state: IState;
    }
  | { kind: 'state'; state: IState }
  | { kind: 'reply'; id: string; ok: true; result: unknown }
  | {
      kind: 'reply';
      id: string;
      ok: false;
      error: { type: string; message: string; estimate?: IEstimate | null };
    }
  | { kind: 'event'; event: INotice };

/** What the panel may ask the kernel to do. */
export type Action =
  | 'pull'
  | 'load'
  | 'unload'
  | 'estimate'
  | 'serve'
  | 'stop'
  | 'state'
  | 'configure';

/** Panel → kernel. */
export interface IRequest {
  kind: 'request';
  id: string;
  action: Action;
  args: { [key: string]: unknown };
}

/** The data of the panel's comm_open. */
export interface IHello {
  kind: 'hello';
  protocol: number;
  refresh?: number;
}
