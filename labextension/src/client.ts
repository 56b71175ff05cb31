/**
 * The panel's side of the comm target `jupyter_llm`: one client per kernel connection.
 *
 * Attaching follows three rules, learned the hard way (NOTES §7):
 * - the kernel opens the comm itself when `%load_ext jupyter_llm` runs, so the client registers
 *   the comm target and takes whatever comm the kernel opens;
 * - the client opens a comm itself exactly once per occasion: when it starts (page reload,
 *   notebook switch), after a kernel restart, and after the user's "enable" button. Never on every
 *   "idle": JupyterLab and ipykernel exchange background requests, and retrying there loops;
 * - a kernel without the extension answers an open with comm_close: that means "not loaded".
 *
 * Requests carry a random id (several browser tabs can share one kernel-opened comm, and all of
 * them see every reply) and are answered exactly once; a closed comm rejects what is pending.
 */
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import {
  Action,
  COMM_TARGET,
  IAlias,
  IHello,
  INotice,
  IRequest,
  IState,
  KernelMessage,
  PROTOCOL_VERSION
} from './protocol';

/** The part of `Kernel.IComm` the client uses (a structural subset, so tests can fake it). */
export interface ICommLike {
  readonly commId: string;
  readonly isDisposed: boolean;
  onMsg: (msg: { content: { data: unknown } }) => void | PromiseLike<void>;
  onClose: (msg: { content: { data: unknown } }) => void | PromiseLike<void>;
  open(data?: any): unknown;
  /** With `disposeOnDone` false the returned future also hears the kernel refusing the message. */
  send(data: any, metadata?: any, buffers?: any[], disposeOnDone?: boolean): IFutureLike | unknown;
  close(data?: any): unknown;
}

/** The part of a shell future the client uses. */
export interface IFutureLike {
  onReply: (msg: any) => void | PromiseLike<void>;
  dispose(): void;
}

/** The part of `Kernel.IKernelConnection` the client uses. */
export interface IKernelLike {
  readonly id: string;
  readonly status: string;
  readonly connectionStatus: string;
  readonly isDisposed: boolean;
  readonly statusChanged: ISignal<any, any>;
  readonly connectionStatusChanged: ISignal<any, any>;
  registerCommTarget(
    targetName: string,
    callback: (comm: any, msg: any) => void | PromiseLike<void>
  ): void;
  removeCommTarget(
    targetName: string,
    callback: (comm: any, msg: any) => void | PromiseLike<void>
  ): void;
  createComm(targetName: string, commId?: string): ICommLike;
  requestExecute(content: {
    code: string;
    silent?: boolean;
    store_history?: boolean;
    stop_on_error?: boolean;
  }): { done: PromiseLike<any>; onIOPub: (msg: any) => void | PromiseLike<void> };
}

/**
 * - `connecting`: a comm open was sent, no answer yet (a busy kernel answers after its cell);
 * - `attached`: the kernel's manager is talking to us;
 * - `not-loaded`: the kernel has no `jupyter_llm` comm target (extension not loaded);
 * - `enabling`: `%load_ext jupyter_llm` is running in the kernel on the user's request;
 * - `restarting`, `dead`: the kernel's own states; `disposed`: the client is done.
 */
export type ClientStatus =
  | 'connecting'
  | 'attached'
  | 'not-loaded'
  | 'enabling'
  | 'restarting'
  | 'dead'
  | 'disposed';

/** An error the kernel reported for a request (its Python type and message). */
export class RequestError extends Error {
  constructor(
    readonly type: string,
    message: string,
    readonly details: { [key: string]: unknown } = {}
  ) {
    super(message);
    this.name = type;
  }
}

interface IPending {
  resolve: (value: any) => void;
  reject: (reason: Error) => void;
  message: IRequest;
  /** Sent again once already (after the kernel could not take it). */
  retried: boolean;
  future: IFutureLike | null;
}

/** Options for {@link LLMClient}. */
export interface IClientOptions {
  /** Seconds between the kernel's periodic device refreshes (0: only on events). */
  refresh?: number;
  /** Random request ids; injectable for tests. */
  newId?: () => string;
}

export class LLMClient implements IDisposable {
  constructor(
    readonly kernel: IKernelLike,
    options: IClientOptions = {}
  ) {
    this._refresh = options.refresh ?? 2;
    this._newId = options.newId ?? randomId;
    this.kernel.registerCommTarget(COMM_TARGET, this._onKernelOpen);
    this.kernel.statusChanged.connect(this._onKernelStatus, this);
    this.kernel.connectionStatusChanged.connect(this._onConnection, this);
    this._openOnce();
  }

  /** Emits whenever {@link status} changes. */
  get statusChanged(): ISignal<this, ClientStatus> {
    return this._statusChanged;
  }

  /** Emits every state the kernel pushes. */
  get stateChanged(): ISignal<this, IState> {
    return this._stateChanged;
  }

  /** Emits notable manager events (a load failed, a model was evicted…). */
  get noticed(): ISignal<this, INotice> {
    return this._noticed;
  }

  get status(): ClientStatus {
    return this._status;
  }

  /** The latest state, or null before the kernel has sent one. */
  get state(): IState | null {
    return this._state;
  }

  /** Names that can be pulled (the kernel's alias table). */
  get aliases(): IAlias[] {
    return this._aliases;
  }

  /** The kernel package's version, once attached. */
  get kernelVersion(): string | null {
    return this._version;
  }

  /** Why enabling failed, when it did. */
  get lastError(): string | null {
    return this._lastError;
  }

  get isDisposed(): boolean {
    return this._status === 'disposed';
  }

  /**
   * Ask the kernel's manager to do something; resolves with its result or rejects with a
   * {@link RequestError}. The kernel runs it in a background thread, so the kernel stays free.
   */
  request<T = unknown>(action: Action, args: { [key: string]: unknown } = {}): Promise<T> {
    const comm = this._comm;
    if (this._status !== 'attached' || comm === null || comm.isDisposed) {
      return Promise.reject(
        new RequestError(
          'NotAttached',
          'jupyter_llm is not loaded in this kernel: run %load_ext jupyter_llm'
        )
      );
    }
    const id = this._newId();
    const message: IRequest = { kind: 'request', id, action, args };
    return new Promise<T>((resolve, reject) => {
      const pending: IPending = { resolve, reject, message, retried: false, future: null };
      this._pending.set(id, pending);
      this._send(comm, pending);
    });
  }

  /** Change how often the kernel pushes device memory when nothing else happens. */
  setRefresh(seconds: number): void {
    this._refresh = seconds;
    if (this._status === 'attached') {
      this.request('configure', { refresh: seconds }).catch(() => undefined);
    }
  }

  /**
   * Run `%load_ext jupyter_llm` in the kernel. The kernel then opens the comm itself; if the
   * extension was loaded already (so no comm comes), the client opens one once more.
   */
  async enable(): Promise<void> {
    if (this._status === 'attached' || this._status === 'disposed') {
      return;
    }
    this._lastError = null;
    this._setStatus('enabling');
    const future = this.kernel.requestExecute({
      code: '%load_ext jupyter_llm',
      silent: false,
      store_history: false,
      stop_on_error: false
    });
    let error: string | null = null;
    future.onIOPub = (msg: any) => {
      if (msg?.header?.msg_type === 'error') {
        const content = msg.content ?? {};
        error = `${content.ename ?? 'Error'}: ${content.evalue ?? ''}`;
      }
    };
    try {
      const reply = await future.done;
      if (reply?.content?.status === 'error' && error === null) {
        error = `${reply.content.ename}: ${reply.content.evalue}`;
      }
    } catch (reason) {
      error = String(reason);
    }
    // the kernel may have opened its comm while we awaited the reply (its hello follows)
    if (this.isDisposed || this.status === 'attached' || this._comm !== null) {
      return;
    }
    if (error !== null) {
      this._lastError = error;
      this._setStatus('not-loaded');
      return;
    }
    this._status = 'not-loaded'; // allow the one open below
    this._openOnce();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    const comm = this._comm;
    this._comm = null;
    this._rejectAll('the panel stopped following this kernel');
    if (comm && !comm.isDisposed) {
      try {
        comm.close();
      } catch {
        // the kernel may already be gone
      }
    }
    if (!this.kernel.isDisposed) {
      this.kernel.removeCommTarget(COMM_TARGET, this._onKernelOpen);
    }
    this.kernel.statusChanged.disconnect(this._onKernelStatus, this);
    this.kernel.connectionStatusChanged.disconnect(this._onConnection, this);
    this._setStatus('disposed');
    Signal.clearData(this);
  }

  // -- sending ---------------------------------------------------------------------------

  private _send(comm: ICommLike, pending: IPending): void {
    try {
      // keep the future: a kernel that cannot route the message answers with an error reply
      const future = comm.send(pending.message, {}, [], false) as IFutureLike | undefined;
      if (future && typeof future === 'object' && 'onReply' in future) {
        pending.future = future;
        future.onReply = (msg: any) => {
          if (msg?.content?.status === 'error') {
            this._undelivered(pending, msg.content);
          }
        };
      }
    } catch (error) {
      this._settle(pending.message.id);
      pending.reject(error instanceof Error ? error : new Error(String(error)));
    }
  }

  /**
   * The kernel refused a request without running it. Seen with JupyterLab 4.6, which sends comm
   * messages over a per-target kernel subshell and can delete that subshell while a new comm
   * still uses it ("Unknown subshell_id"): every later message on that comm is lost. So: attach
   * a fresh comm and send the request once more; a second refusal is an error.
   */
  private _undelivered(pending: IPending, content: { ename?: string; evalue?: string }): void {
    const id = pending.message.id;
    if (!this._pending.has(id)) {
      return;
    }
    if (pending.retried) {
      this._settle(id);
      pending.reject(new RequestError(content.ename ?? 'KernelError',
        `${pending.message.action}: the kernel could not take the request (${content.evalue ?? 'no reason given'})`));
      return;
    }
    pending.future?.dispose();
    pending.future = null;
    pending.retried = true;
    this._resend.push(pending);
    if (this._comm !== null) {
      // left open and wired: replies to requests already running in the kernel still arrive on it
      this._comm = null;
      this._setStatus('connecting');
      this._openOnce();
    }
  }

  /** Forget a request (its reply came, or it failed) and release its future. */
  private _settle(id: string): IPending | undefined {
    const pending = this._pending.get(id);
    this._pending.delete(id);
    pending?.future?.dispose();
    return pending;
  }

  // -- attaching -------------------------------------------------------------------------

  /** Open a comm from the panel, unless one is attached or an open is already under way. */
  private _openOnce(): void {
    if (this.isDisposed || this._status === 'attached' || this._opening) {
      return;
    }
    if (this.kernel.connectionStatus !== 'connected') {
      this._openWhenConnected = true; // a message sent before the socket is up can be lost
      this._setStatus('connecting');
      return;
    }
    this._openWhenConnected = false;
    const comm = this.kernel.createComm(COMM_TARGET);
    this._opening = comm;
    this._wire(comm);
    this._setStatus('connecting');
    const hello: IHello = { kind: 'hello', protocol: PROTOCOL_VERSION, refresh: this._refresh };
    try {
      comm.open(hello);
    } catch {
      this._opening = null;
      this._setStatus('not-loaded');
    }
  }

  /** The kernel opened a comm to us (it loaded the extension, or another open was answered). */
  private _onKernelOpen = (comm: ICommLike, msg: { content: { data: unknown } }): void => {
    if (this.isDisposed) {
      return;
    }
    this._wire(comm);
    this._adopt(comm);
    this._handle(comm, msg?.content?.data);
  };

  private _wire(comm: ICommLike): void {
    comm.onMsg = msg => this._handle(comm, msg?.content?.data);
    comm.onClose = () => this._closed(comm);
  }

  /** Make `comm` the one in use; an older one is closed (the kernel forgets its view). */
  private _adopt(comm: ICommLike): void {
    if (this._comm === comm) {
      return;
    }
    const old = this._comm;
    this._comm = comm;
    if (this._opening !== null && this._opening !== comm) {
      // our own open is now redundant: close it when it answers (or now, if it can be)
      this._closeQuietly(this._opening);
    }
    this._opening = null;
    if (old !== null) {
      this._rejectAll('the kernel replaced the connection');
      this._closeQuietly(old);
    }
  }

  private _closeQuietly(comm: ICommLike): void {
    comm.onMsg = () => undefined;
    comm.onClose = () => undefined;
    if (!comm.isDisposed) {
      try {
        comm.close();
      } catch {
        // nothing to do: the kernel side is gone
      }
    }
  }

  private _handle(comm: ICommLike, data: unknown): void {
    const message = data as KernelMessage | undefined;
    if (!message || typeof message !== 'object' || this.isDisposed) {
      return;
    }
    switch (message.kind) {
      case 'hello':
        this._adopt(comm);
        this._aliases = message.aliases ?? [];
        this._version = message.version ?? null;
        this._lastError = null;
        this._setState(message.state);
        this._setStatus('attached');
        for (const pending of this._resend.splice(0)) {
          this._send(comm, pending);
        }
        if (message.refresh !== this._refresh) {
          // a kernel-opened comm (or another tab) set another rate: this panel's setting wins
          this.setRefresh(this._refresh);
        }
        break;
      case 'state':
        if (comm === this._comm) {
          this._setState(message.state);
        }
        break;
      case 'reply': {
        const pending = this._settle(message.id);
        if (pending === undefined) {
          return; // another tab's request on a shared comm
        }
        if (message.ok) {
          pending.resolve(message.result);
        } else {
          const { type, message: text, ...details } = message.error;
          pending.reject(new RequestError(type, text, details));
        }
        break;
      }
      case 'event':
        if (comm === this._comm) {
          this._noticed.emit(message.event);
        }
        break;
    }
  }

  private _closed(comm: ICommLike): void {
    if (comm === this._opening) {
      // the kernel refused our open: no comm target, so the extension is not loaded
      this._opening = null;
      if (this._status !== 'attached') {
        this._setStatus('not-loaded');
      }
      return;
    }
    if (comm !== this._comm) {
      return;
    }
    this._comm = null;
    this._rejectAll('the kernel closed the connection (%unload_ext, or a restart)');
    if (!this.isDisposed && this._status !== 'restarting' && this._status !== 'dead') {
      this._setStatus('not-loaded');
    }
  }

  // -- kernel lifecycle -------------------------------------------------------------------

  private _onKernelStatus(_: unknown, status: string): void {
    if (this.isDisposed) {
      return;
    }
    if (status === 'restarting' || status === 'autorestarting') {
      // the kernel's comms are gone with its process; open once when the new one is idle
      this._comm = null;
      this._opening = null;
      this._rejectAll('the kernel restarted');
      this._reopenAfterRestart = true;
      this._setStatus('restarting');
    } else if (status === 'dead') {
      this._comm = null;
      this._opening = null;
      this._rejectAll('the kernel died');
      this._setStatus('dead');
    } else if (status === 'idle' && this._reopenAfterRestart) {
      this._reopenAfterRestart = false;
      this._status = 'not-loaded';
      this._openOnce();
    }
  }

  private _onConnection(_: unknown, status: string): void {
    if (status === 'connected' && this._openWhenConnected) {
      this._openOnce();
    }
  }

  // -- bookkeeping ------------------------------------------------------------------------

  private _rejectAll(reason: string): void {
    const pending = [...this._pending.keys()].map(id => this._settle(id)!);
    this._resend = [];
    for (const p of pending) {
      p.reject(new RequestError('ConnectionClosed', `${p.message.action}: ${reason}`));
    }
  }

  private _setState(state: IState): void {
    this._state = state;
    this._stateChanged.emit(state);
  }

  private _setStatus(status: ClientStatus): void {
    if (status === this._status) {
      return;
    }
    this._status = status;
    this._statusChanged.emit(status);
  }

  private _comm: ICommLike | null = null;
  private _opening: ICommLike | null = null;
  private _openWhenConnected = false;
  private _reopenAfterRestart = false;
  private _status: ClientStatus = 'connecting';
  private _state: IState | null = null;
  private _aliases: IAlias[] = [];
  private _version: string | null = null;
  private _lastError: string | null = null;
  private _refresh: number;
  private _newId: () => string;
  private _pending = new Map<string, IPending>();
  private _resend: IPending[] = [];
  private _statusChanged = new Signal<this, ClientStatus>(this);
  private _stateChanged = new Signal<this, IState>(this);
  private _noticed = new Signal<this, INotice>(this);
}

function randomId(): string {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, b => b.toString(16).padStart(2, '0')).join('');
}
