/**
 * The parts of JupyterLab's kernel connection, comms and shell futures that the client uses, as
 * structural subsets: the real `Kernel.IKernelConnection` satisfies them, and node tests fake them.
 */
import { ISignal } from '@lumino/signaling';

/** The part of `Kernel.IComm` the client uses. */
export interface ICommLike {
  readonly commId: string;
  readonly isDisposed: boolean;
  onMsg: (msg: { content: { data: unknown } }) => void | PromiseLike<void>;
  onClose: (msg: { content: { data: unknown } }) => void | PromiseLike<void>;
  open(data?: any): unknown;
  /** With `disposeOnDone` false the returned future also hears the kernel refusing the message. */
  send(
    data: any,
    metadata?: any,
    buffers?: any[],
    disposeOnDone?: boolean
  ): IFutureLike | unknown;
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
  }): {
    done: PromiseLike<any>;
    onIOPub: (msg: any) => void | PromiseLike<void>;
  };
}
