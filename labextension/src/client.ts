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
 * Requests and their replies (and the incident behind resending one) are in `requests.ts`, the
 * structural kernel types in `kernel.ts`.
 */
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import { ICommLike, IKernelLike } from './kernel';
import {
  Action,
  COMM_TARGET,
  DEFAULT_REFRESH_SECONDS,
  IAlias,
  IHello,
  INotice,
  IState,
  KernelMessage,
  PROTOCOL_VERSION
} from './protocol';
import { PendingRequests, RequestError } from './requests';

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
    this._refresh = options.refresh ?? DEFAULT_REFRESH_SECONDS;
    this._requests = new PendingRequests({
      newId: options.newId,
      refused: () => this._reattach()
    });
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
  request<T = unknown>(
    action: Action,
    args: { [key: string]: unknown } = {}
  ): Promise<T> {
    const comm = this._comm;
    if (this._status !== 'attached' || comm === null || comm.isDisposed) {
      return Promise.reject(
        new RequestError(
          'NotAttached',
          'jupyter_llm is not loaded in this kernel: run %load_ext jupyter_llm'
        )
      );
    }
    return this._requests.send<T>(comm, action, args);
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
    this._requests.rejectAll('the panel stopped following this kernel');
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
    const hello: IHello = {
      kind: 'hello',
      protocol: PROTOCOL_VERSION,
      refresh: this._refresh
    };
    try {
      comm.open(hello);
    } catch {
      this._opening = null;
      this._setStatus('not-loaded');
    }
  }

  /**
   * The kernel refused a request on the comm in use, so that comm is lost: attach a fresh one
   * (the requests wait for its hello). The old comm is left open and wired: replies to requests
   * already running in the kernel still arrive on it.
   */
  private _reattach(): void {
    if (this._comm !== null) {
      this._comm = null;
      this._setStatus('connecting');
      this._openOnce();
    }
  }

  /** The kernel opened a comm to us (it loaded the extension, or another open was answered). */
  private _onKernelOpen = (
    comm: ICommLike,
    msg: { content: { data: unknown } }
  ): void => {
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
      this._requests.rejectAll('the kernel replaced the connection');
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
        this._requests.resend(comm);
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
      case 'reply':
        this._requests.reply(message);
        break;
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
    this._requests.rejectAll(
      'the kernel closed the connection (%unload_ext, or a restart)'
    );
    if (
      !this.isDisposed &&
      this._status !== 'restarting' &&
      this._status !== 'dead'
    ) {
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
      this._requests.rejectAll('the kernel restarted');
      this._reopenAfterRestart = true;
      this._setStatus('restarting');
    } else if (status === 'dead') {
      this._comm = null;
      this._opening = null;
      this._requests.rejectAll('the kernel died');
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
  private _requests: PendingRequests;
  private _statusChanged = new Signal<this, ClientStatus>(this);
  private _stateChanged = new Signal<this, IState>(this);
  private _noticed = new Signal<this, INotice>(this);
}
