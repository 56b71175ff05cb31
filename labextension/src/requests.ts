/**
 * The client's requests to the kernel's manager, each answered by exactly one reply.
 *
 * Requests carry a random id (several browser tabs can share one kernel-opened comm, and all of
 * them see every reply) and are answered exactly once; a closed comm rejects what is pending.
 */
import { ICommLike, IFutureLike } from './kernel';
import { Action, IRequest, KernelMessage } from './protocol';

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

/** The kernel's answer to one request. */
export type ReplyMessage = Extract<KernelMessage, { kind: 'reply' }>;

interface IPending {
  resolve: (value: any) => void;
  reject: (reason: Error) => void;
  message: IRequest;
  /** Sent again once already (after the kernel could not take it). */
  retried: boolean;
  future: IFutureLike | null;
}

/** Options for {@link PendingRequests}. */
export interface IPendingOptions {
  /** Random request ids; injectable for tests. */
  newId?: () => string;
  /**
   * The kernel refused a request without running it: the comm it went on is lost, so attach a
   * fresh one; {@link PendingRequests.resend} then sends the refused requests on it.
   */
  refused: () => void;
}

/** The requests sent and not answered yet, by id. */
export class PendingRequests {
  constructor(options: IPendingOptions) {
    this._newId = options.newId ?? randomId;
    this._refused = options.refused;
  }

  /** Send a request on `comm`; settles with the reply of the same id. */
  send<T>(
    comm: ICommLike,
    action: Action,
    args: { [key: string]: unknown }
  ): Promise<T> {
    const id = this._newId();
    const message: IRequest = { kind: 'request', id, action, args };
    return new Promise<T>((resolve, reject) => {
      const pending: IPending = {
        resolve,
        reject,
        message,
        retried: false,
        future: null
      };
      this._pending.set(id, pending);
      this._send(comm, pending);
    });
  }

  /** Settle the request `message` answers; a reply to another tab's request is ignored. */
  reply(message: ReplyMessage): void {
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
  }

  /** Send the requests the kernel refused once more, on the freshly attached `comm`. */
  resend(comm: ICommLike): void {
    for (const pending of this._resend.splice(0)) {
      this._send(comm, pending);
    }
  }

  /** Reject everything pending: the connection it went on is gone. */
  rejectAll(reason: string): void {
    const pending = [...this._pending.keys()].map(id => this._settle(id)!);
    this._resend = [];
    for (const p of pending) {
      p.reject(
        new RequestError('ConnectionClosed', `${p.message.action}: ${reason}`)
      );
    }
  }

  private _send(comm: ICommLike, pending: IPending): void {
    try {
      // keep the future: a kernel that cannot route the message answers with an error reply
      const future = comm.send(pending.message, {}, [], false) as
        IFutureLike | undefined;
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
  private _undelivered(
    pending: IPending,
    content: { ename?: string; evalue?: string }
  ): void {
    const id = pending.message.id;
    if (!this._pending.has(id)) {
      return;
    }
    if (pending.retried) {
      this._settle(id);
      const reason = content.evalue ?? 'no reason given';
      pending.reject(
        new RequestError(
          content.ename ?? 'KernelError',
          `${pending.message.action}: the kernel could not take the request (${reason})`
        )
      );
      return;
    }
    pending.future?.dispose();
    pending.future = null;
    pending.retried = true;
    this._resend.push(pending);
    this._refused();
  }

  /** Forget a request (its reply came, or it failed) and release its future. */
  private _settle(id: string): IPending | undefined {
    const pending = this._pending.get(id);
    this._pending.delete(id);
    pending?.future?.dispose();
    return pending;
  }

  private _newId: () => string;
  private _refused: () => void;
  private _pending = new Map<string, IPending>();
  private _resend: IPending[] = [];
}

function randomId(): string {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, b => b.toString(16).padStart(2, '0')).join('');
}
