/**
 * A fake kernel connection that behaves like JupyterLab's for the parts the client uses (comm
 * targets, comm open/close, execute, status signals), built on the structural types of
 * src/kernel.ts, and a state to push through it.
 */
import { Signal } from '@lumino/signaling';

import { ICommLike, IKernelLike } from '../src/kernel';
import { COMM_TARGET, IDevice, ILoadedModel, IState } from '../src/protocol';

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

/** The host as the kernel reports it. */
export const CPU: IDevice = {
  id: 'CPU',
  kind: 'cpu',
  name: 'Xeon',
  total_bytes: 24 * GiB,
  free_bytes: 20 * GiB,
  used_bytes: 4 * GiB,
  backend: 'CPU'
};

/** A loaded SmolLM2 on the CPU as the kernel reports it; ``fields`` override. */
export function loadedModel(fields: Partial<ILoadedModel> = {}): ILoadedModel {
  return {
    name: 'smollm2',
    size: 98 * MiB,
    options: {
      gpu_layers: 0,
      n_ctx: 4096,
      kv_type: 'f16',
      flash_attn: false,
      parallel: 1
    },
    n_ctx: 4096,
    pid: 42,
    loaded_at: 0,
    expires_at: null,
    active: 0,
    estimate: null,
    measured: {},
    ...fields
  };
}

export const STATE: IState = {
  models: [
    { name: 'smollm2', source: 'pip', files: ['/m.gguf'], size: 98362432 }
  ],
  loaded: [],
  pulls: [],
  devices: [],
  server: null
};

export class FakeFuture {
  onReply: (msg: any) => void = () => undefined;
  disposed = false;
  dispose(): void {
    this.disposed = true;
  }
  /** The kernel refuses the message (as ipykernel does for an unknown subshell). */
  refuse(evalue = "Unknown subshell_id 'gone'"): void {
    this.onReply({
      content: { status: 'error', ename: 'UnknownSubshellError', evalue }
    });
  }
}

export class FakeComm implements ICommLike {
  constructor(
    readonly kernel: FakeKernel,
    readonly commId: string,
    readonly openedByKernel: boolean
  ) {}
  onMsg: ICommLike['onMsg'] = () => undefined;
  onClose: ICommLike['onClose'] = () => undefined;
  opened: unknown[] = [];
  sent: any[] = [];
  futures: FakeFuture[] = [];
  closed = false;
  get isDisposed(): boolean {
    return this.closed;
  }
  open(data?: unknown): void {
    this.opened.push(data);
    this.kernel.opens.push(this);
  }
  send(data: unknown): FakeFuture {
    this.sent.push(data);
    const future = new FakeFuture();
    this.futures.push(future);
    return future;
  }
  close(): void {
    this.closed = true;
  }
  /** The kernel sends a comm message. */
  receive(data: unknown): void {
    void this.onMsg({ content: { data } });
  }
  /** The kernel closes the comm. */
  closeFromKernel(): void {
    this.closed = true;
    void this.onClose({ content: { data: {} } });
  }
  hello(state: IState = STATE, refresh = 2): void {
    this.receive({
      kind: 'hello',
      protocol: 1,
      version: '0.1.0',
      aliases: [{ name: 'mistral', description: 'd' }],
      refresh,
      state
    });
  }
}

export class FakeKernel implements IKernelLike {
  id = 'kernel-1';
  status = 'idle';
  connectionStatus = 'connected';
  isDisposed = false;
  statusChanged = new Signal<any, string>(this);
  connectionStatusChanged = new Signal<any, string>(this);
  targets = new Map<string, (comm: any, msg: any) => void>();
  opens: FakeComm[] = [];
  executed: string[] = [];
  executeResult: { error?: { ename: string; evalue: string } } = {};
  private n = 0;

  registerCommTarget(name: string, cb: (comm: any, msg: any) => void): void {
    this.targets.set(name, cb);
  }
  removeCommTarget(name: string): void {
    this.targets.delete(name);
  }
  createComm(): FakeComm {
    return new FakeComm(this, `c${++this.n}`, false);
  }
  /** The kernel opens a comm to the front end (as `%load_ext jupyter_llm` does). */
  openFromKernel(data: unknown): FakeComm {
    const comm = new FakeComm(this, `k${++this.n}`, true);
    this.targets.get(COMM_TARGET)!(comm, { content: { data } });
    return comm;
  }
  requestExecute(content: { code: string }) {
    this.executed.push(content.code);
    const future = {
      onIOPub: (_msg: any): void => undefined,
      done: Promise.resolve().then(() => {
        const error = this.executeResult.error;
        if (error) {
          future.onIOPub({ header: { msg_type: 'error' }, content: error });
          return { content: { status: 'error', ...error } };
        }
        return { content: { status: 'ok' } };
      })
    };
    return future;
  }
  setStatus(status: string): void {
    this.status = status;
    this.statusChanged.emit(status);
  }
  setConnection(status: string): void {
    this.connectionStatus = status;
    this.connectionStatusChanged.emit(status);
  }
}

export function ids(): () => string {
  let n = 0;
  return () => `r${++n}`;
}
