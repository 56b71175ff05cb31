/**
 * The left-sidebar panel: a view of the active notebook's kernel manager, drawn with plain DOM.
 *
 * The form parts (the load form of form.ts, the pull box) are built once so typing is never
 * interrupted; the sections that show the state (sections.ts) are redrawn from each pushed
 * state, each only when its own slice of it changed (slices.ts). Every action is one request to
 * the kernel; the next pushed state shows its effect.
 */
import { Clipboard } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { ClientStatus, LLMClient } from './client';
import { LoadForm } from './form';
import { IEstimate, INotice } from './protocol';
import { RequestError } from './requests';
import { StateSections } from './sections';
import { DEFAULT_SETTINGS, IPanelSettings } from './settings';
import { SectionRedraw } from './slices';
import { button, h } from './views';

const STATUS_TEXT: { [K in ClientStatus]: string } = {
  connecting: 'connecting to the kernel…',
  attached: 'connected',
  'not-loaded': 'jupyter_llm is not loaded in this kernel',
  enabling: 'loading jupyter_llm in the kernel…',
  restarting: 'the kernel is restarting…',
  dead: 'the kernel is dead',
  disposed: ''
};

type Act = 'pull' | 'load' | 'unload' | 'serve' | 'stop';

export class LLMPanel extends Widget {
  constructor() {
    super();
    this.addClass('jp-LLM-panel');
    this.title.caption = 'Local LLM models';
    this._build();
    this._renderMessage();
    this._render();
  }

  /** Follow a new kernel (or none); `label` names the notebook. */
  setClient(client: LLMClient | null, label: string): void {
    if (this._client !== null) {
      this._client.statusChanged.disconnect(this._render, this);
      this._client.stateChanged.disconnect(this._render, this);
      this._client.noticed.disconnect(this._onNotice, this);
    }
    this._client = client;
    this._label = label;
    this._message = null;
    if (client !== null) {
      client.statusChanged.connect(this._render, this);
      client.stateChanged.connect(this._render, this);
      client.noticed.connect(this._onNotice, this);
    }
    this._form.showEstimate(null);
    this._renderMessage();
    this._render();
    this._scheduleEstimate();
  }

  get client(): LLMClient | null {
    return this._client;
  }

  setSettings(settings: Readonly<IPanelSettings>): void {
    this._settings = settings;
    this._client?.setRefresh(settings.refresh);
    this._render();
  }

  // -- building the static parts ------------------------------------------------------------

  private _build(): void {
    const sections = this._sections;
    this._pullInput = h('input', {
      class: 'jp-LLM-input jp-LLM-pull-name',
      placeholder: 'smollm2, hf.co/USER/REPO:Q4_K_M, pip:PKG, /path/model.gguf',
      'aria-label': 'model to pull'
    }) as HTMLInputElement;
    this._pullInput.addEventListener('keydown', e => {
      if (e.key === 'Enter') {
        void this._pull();
      }
    });
    const pullButton = button('Pull', 'jp-LLM-pull', () => void this._pull());
    const section = (title: string, ...children: HTMLElement[]) =>
      h(
        'section',
        { class: 'jp-LLM-section' },
        h('h3', { class: 'jp-LLM-section-title' }, title),
        ...children
      );
    this.node.append(
      h(
        'header',
        { class: 'jp-LLM-header' },
        h('h2', {}, 'Local models'),
        this._kernelLabel
      ),
      sections.banner,
      this._messageBox,
      section('Devices', sections.devices),
      section('Loaded', sections.loaded),
      section('Cached', sections.models),
      section('Load', ...this._form.nodes),
      section(
        'Pull',
        h('div', { class: 'jp-LLM-inline' }, this._pullInput, pullButton),
        sections.pulls
      ),
      section('Remote engines', sections.remotes),
      section('API server', sections.server)
    );
  }

  // -- drawing -------------------------------------------------------------------------------

  /** The kernel line, then every state section whose slice changed. */
  private _render(): void {
    const client = this._client;
    const status: ClientStatus | 'none' = client ? client.status : 'none';
    this.node.dataset.status = status;
    this._kernelLabel.textContent = client
      ? `${this._label} — ${STATUS_TEXT[client.status]}`
      : this._label
        ? `${this._label} — no kernel`
        : 'open a notebook to see its kernel’s models';
    const state = client?.status === 'attached' ? client.state : null;
    this.node.classList.toggle('jp-LLM-detached', state === null);
    this._redraw.update({
      status,
      lastError: client?.lastError ?? null,
      state,
      shown: this._settings.devices,
      busy: this._busy,
      aliases: client?.aliases ?? [],
      now: Date.now() / 1000
    });
  }

  private _renderMessage(): void {
    this._messageBox.replaceChildren();
    const m = this._message;
    this._messageBox.hidden = m === null;
    if (m === null) {
      return;
    }
    this._messageBox.className = `jp-LLM-message jp-LLM-message-${m.kind}`;
    this._messageBox.append(h('span', {}, m.text));
    if (m.force) {
      this._messageBox.append(
        button('Load anyway', 'jp-LLM-force', () => void this._load(true))
      );
    }
    this._messageBox.append(
      button(
        '×',
        'jp-LLM-dismiss',
        () => {
          this._message = null;
          this._renderMessage();
        },
        { title: 'dismiss' }
      )
    );
  }

  // -- actions -------------------------------------------------------------------------------

  /** Re-price the load form shortly after the user stops typing (one request, not one per key). */
  private _scheduleEstimate(): void {
    window.clearTimeout(this._estimateTimer);
    this._estimateTimer = window.setTimeout(
      () => void this._runEstimate(),
      150
    );
  }

  private async _runEstimate(): Promise<void> {
    const name = this._form.name;
    const options = this._form.options();
    const client = this._client;
    if (
      !name ||
      client?.status !== 'attached' ||
      !client.state?.models.some(m => m.name === name)
    ) {
      this._form.showEstimate(typeof options === 'string' ? options : null);
      return;
    }
    if (typeof options === 'string') {
      this._form.showEstimate(options);
      return;
    }
    const ticket = ++this._estimateTicket;
    try {
      const est = await client.request<IEstimate>('estimate', {
        name,
        options
      });
      if (ticket === this._estimateTicket) {
        this._form.showEstimate(est);
      }
    } catch (error) {
      if (ticket === this._estimateTicket) {
        this._form.showEstimate((error as Error).message);
      }
    }
  }

  private async _load(force: boolean): Promise<void> {
    const name = this._form.name;
    const options = this._form.options();
    if (!name) {
      this._setMessage(
        'error',
        'Type a model name (or pick a cached one) to load.'
      );
      return;
    }
    if (typeof options === 'string') {
      this._setMessage('error', options);
      return;
    }
    await this._act(
      'load',
      { name, options, force },
      `${name} loaded`,
      `load:${name}`
    );
  }

  private async _pull(): Promise<void> {
    const name = this._pullInput.value.trim();
    if (!name) {
      this._setMessage('error', 'Type a model to pull, e.g. smollm2.');
      return;
    }
    await this._act('pull', { name }, `${name} pulled`, `pull:${name}`);
  }

  private _serve(): void {
    const text = this._sections.port.value.trim();
    if (text !== '' && !/^\d+$/.test(text)) {
      this._setMessage(
        'error',
        'port: give a whole number (0 picks a free port), or leave it empty for 11434'
      );
      return;
    }
    const args = text === '' ? {} : { port: Number(text) };
    void this._act('serve', args, 'API server started');
  }

  private async _act(
    action: Act,
    args: { [k: string]: unknown },
    done: string,
    busyKey: string = action
  ): Promise<void> {
    const client = this._client;
    if (client === null) {
      return;
    }
    this._busy.add(busyKey);
    this._setMessage('info', `${action}…`);
    try {
      const result = await client.request<unknown>(action, args);
      // a load on an rpc-server outside private networks comes back with the kernel's warning
      const warnings = (result as { warnings?: unknown } | null)?.warnings;
      this._setMessage(
        'info',
        Array.isArray(warnings) && warnings.length > 0
          ? `${done} — warning: ${warnings.join(' ')}`
          : done
      );
    } catch (error) {
      const e = error as RequestError;
      this._setMessage(
        'error',
        e.message,
        action === 'load' && e.type === 'WontFitError'
      );
    } finally {
      this._busy.delete(busyKey);
      this._render();
    }
  }

  private _onNotice(_: unknown, notice: INotice): void {
    if (notice.type === 'load_failed') {
      this._setMessage('error', `${notice.name}: ${notice.error}`);
    } else if (
      notice.type === 'unloaded' &&
      notice.reason &&
      notice.reason !== 'unloaded'
    ) {
      this._setMessage('info', `${notice.name}: ${notice.reason}`);
    }
  }

  private _setMessage(
    kind: 'info' | 'error',
    text: string,
    force = false
  ): void {
    this._message = { kind, text, force };
    this._renderMessage();
  }

  private _client: LLMClient | null = null;
  private _label = '';
  private _settings: Readonly<IPanelSettings> = DEFAULT_SETTINGS;
  private _message: {
    kind: 'info' | 'error';
    text: string;
    force: boolean;
  } | null = null;
  private _estimateTimer = 0;
  private _estimateTicket = 0;
  private _busy = new Set<string>();
  private _sections = new StateSections({
    enable: () => void this._client?.enable(),
    pick: name => {
      this._form.name = name;
      this._scheduleEstimate();
    },
    load: name => {
      this._form.name = name;
      void this._load(false);
    },
    unload: name =>
      void this._act('unload', { name }, `${name} unloaded`, `unload:${name}`),
    serve: () => this._serve(),
    stop: () => void this._act('stop', {}, 'API server stopped'),
    copyToken: token => {
      Clipboard.copyToSystem(token);
      this._setMessage('info', 'API token copied to the clipboard');
    }
  });
  private _redraw = new SectionRedraw(this._sections.renderers);
  private _form = new LoadForm({
    changed: () => this._scheduleEstimate(),
    load: () => void this._load(false),
    names: this._sections.names
  });
  private _kernelLabel = h('div', { class: 'jp-LLM-kernel' });
  private _messageBox = h('div', { class: 'jp-LLM-message', role: 'status' });
  private _pullInput!: HTMLInputElement;
}
