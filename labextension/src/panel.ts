/**
 * The left-sidebar panel: a view of the active notebook's kernel manager, drawn with plain DOM.
 *
 * The form parts (load options, pull box) are built once so typing is never interrupted; the
 * lists (devices, loaded models, cached models, pulls, server) are redrawn from each pushed
 * state. Every action is one request to the kernel; the next pushed state shows its effect.
 */
import { Clipboard } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { ClientStatus, LLMClient, RequestError } from './client';
import { estimateSegments, expiry, humanBytes, parseOptions, visibleDevices } from './memory';
import { IEstimate, ILoadedModel, INotice, IState } from './protocol';
import { bar, comparisonTable, deviceView, h, legend, modelBars } from './views';

/** What the panel's settings control (schema/plugin.json). */
export interface IPanelSettings {
  refresh: number;
  devices: string[];
}

const STATUS_TEXT: { [K in ClientStatus]: string } = {
  connecting: 'connecting to the kernel…',
  attached: 'connected',
  'not-loaded': 'jupyter_llm is not loaded in this kernel',
  enabling: 'loading jupyter_llm in the kernel…',
  restarting: 'the kernel is restarting…',
  dead: 'the kernel is dead',
  disposed: ''
};

export class LLMPanel extends Widget {
  constructor() {
    super();
    this.addClass('jp-LLM-panel');
    this.title.caption = 'Local LLM models';
    this._build();
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
    this._estimate = null;
    this._message = null;
    if (client !== null) {
      client.statusChanged.connect(this._render, this);
      client.stateChanged.connect(this._render, this);
      client.noticed.connect(this._onNotice, this);
    }
    this._render();
    this._scheduleEstimate();
  }

  get client(): LLMClient | null {
    return this._client;
  }

  setSettings(settings: IPanelSettings): void {
    this._settings = settings;
    this._client?.setRefresh(settings.refresh);
    this._render();
  }

  // -- building the static parts ------------------------------------------------------------

  private _build(): void {
    const node = this.node;
    this._kernelLabel = h('div', { class: 'jp-LLM-kernel' });
    this._banner = h('div', { class: 'jp-LLM-banner' });
    this._messageBox = h('div', { class: 'jp-LLM-message', role: 'status' });
    this._devices = h('div', { class: 'jp-LLM-devices' });
    this._loaded = h('div', { class: 'jp-LLM-loaded' });
    this._models = h('div', { class: 'jp-LLM-models' });
    this._pulls = h('div', { class: 'jp-LLM-pulls' });
    this._server = h('div', { class: 'jp-LLM-server' });
    this._estimateBox = h('div', { class: 'jp-LLM-estimate' });

    this._nameInput = h('input', {
      class: 'jp-LLM-input jp-LLM-load-name',
      placeholder: 'model name',
      list: 'jp-LLM-names',
      'aria-label': 'model to load'
    }) as HTMLInputElement;
    this._names = h('datalist', { id: 'jp-LLM-names' });
    this._gpuLayers = this._input('gpu-layers', 'auto', 'GPU layers (a number or auto)');
    this._context = this._input('ctx', '4096', 'context in tokens (a number or auto)');
    this._parallel = this._input('parallel', '1', 'parallel slots');
    this._kvType = h('select', { class: 'jp-LLM-input jp-LLM-kv-type', 'aria-label': 'KV cache type' },
      ...['f16', 'q8_0', 'q4_0'].map(t => h('option', { value: t }, t))) as HTMLSelectElement;
    this._flashAttn = h('input', { type: 'checkbox', class: 'jp-LLM-flash-attn' }) as HTMLInputElement;
    for (const el of [this._nameInput, this._gpuLayers, this._context, this._parallel, this._kvType,
      this._flashAttn]) {
      el.addEventListener('input', () => this._scheduleEstimate());
      el.addEventListener('change', () => this._scheduleEstimate());
    }
    const loadButton = this._button('Load', 'jp-LLM-load', () => void this._load(false));

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
    const pullButton = this._button('Pull', 'jp-LLM-pull', () => void this._pull());
    this._portInput = h('input', {
      class: 'jp-LLM-input jp-LLM-port',
      placeholder: 'port (11434)',
      'aria-label': 'API server port; 0 picks a free one'
    }) as HTMLInputElement;

    const section = (title: string, ...children: HTMLElement[]) =>
      h('section', { class: 'jp-LLM-section' }, h('h3', { class: 'jp-LLM-section-title' }, title),
        ...children);
    const row = (label: string, control: HTMLElement) =>
      h('label', { class: 'jp-LLM-row' }, h('span', { class: 'jp-LLM-row-label' }, label), control);

    node.append(
      h('header', { class: 'jp-LLM-header' }, h('h2', {}, 'Local models'), this._kernelLabel),
      this._banner,
      this._messageBox,
      section('Devices', this._devices),
      section('Loaded', this._loaded),
      section('Cached', this._models),
      section('Load',
        row('Model', this._nameInput), this._names,
        row('GPU layers', this._gpuLayers), row('Context', this._context),
        row('KV cache', this._kvType), row('Flash attention', this._flashAttn),
        row('Parallel slots', this._parallel),
        this._estimateBox,
        h('div', { class: 'jp-LLM-actions' }, loadButton)),
      section('Pull', h('div', { class: 'jp-LLM-inline' }, this._pullInput, pullButton), this._pulls),
      section('API server', this._server)
    );
  }

  private _input(name: string, value: string, label: string): HTMLInputElement {
    const el = h('input', { class: `jp-LLM-input jp-LLM-${name}`, 'aria-label': label }) as HTMLInputElement;
    el.value = value;
    return el;
  }

  private _button(text: string, cls: string, onClick: () => void, attrs: { [k: string]: string } = {}
  ): HTMLButtonElement {
    const el = h('button', { class: `jp-Button jp-mod-styled jp-LLM-button ${cls}`, type: 'button', ...attrs },
      text) as HTMLButtonElement;
    el.addEventListener('click', onClick);
    return el;
  }

  // -- drawing the state ---------------------------------------------------------------------

  private _render(): void {
    const client = this._client;
    const status: ClientStatus | 'none' = client ? client.status : 'none';
    this.node.dataset.status = status;
    this._kernelLabel.textContent = client
      ? `${this._label} — ${STATUS_TEXT[client.status]}`
      : this._label
        ? `${this._label} — no kernel`
        : 'open a notebook to see its kernel’s models';
    this._renderBanner(status);
    this._renderMessage();
    const state = client?.status === 'attached' ? client.state : null;
    this.node.classList.toggle('jp-LLM-detached', state === null);
    this._renderDevices(state);
    this._renderLoaded(state);
    this._renderModels(state);
    this._renderPulls(state);
    this._renderServer(state);
    this._renderEstimate();
  }

  private _renderBanner(status: ClientStatus | 'none'): void {
    this._banner.replaceChildren();
    if (status !== 'not-loaded' && status !== 'enabling') {
      this._banner.hidden = true;
      return;
    }
    this._banner.hidden = false;
    const enable = this._button('Load jupyter_llm in this kernel', 'jp-LLM-enable',
      () => void this._client?.enable());
    enable.disabled = status === 'enabling';
    this._banner.append(
      h('p', {}, 'This kernel has not loaded jupyter_llm. Run ', h('code', {}, '%load_ext jupyter_llm'),
        ' in a cell (or add it to your IPython startup), or:'),
      enable
    );
    const error = this._client?.lastError;
    if (error) {
      this._banner.append(h('p', { class: 'jp-LLM-error' }, error,
        ' — is jupyter_llm installed in this kernel’s environment? (pip install jupyter-llm)'));
    }
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
      this._messageBox.append(this._button('Load anyway', 'jp-LLM-force', () => void this._load(true)));
    }
    this._messageBox.append(this._button('×', 'jp-LLM-dismiss', () => {
      this._message = null;
      this._renderMessage();
    }, { title: 'dismiss' }));
  }

  private _renderDevices(state: IState | null): void {
    this._devices.replaceChildren();
    if (state === null) {
      return;
    }
    for (const device of visibleDevices(state.devices, this._settings.devices)) {
      this._devices.append(deviceView(device, state.loaded));
    }
    this._devices.append(legend());
  }

  private _renderLoaded(state: IState | null): void {
    this._loaded.replaceChildren();
    if (state === null) {
      return;
    }
    if (state.loaded.length === 0) {
      this._loaded.append(h('p', { class: 'jp-LLM-empty' }, 'No model is loaded.'));
      return;
    }
    for (const model of state.loaded) {
      this._loaded.append(this._loadedCard(model, state));
    }
  }

  private _loadedCard(model: ILoadedModel, state: IState): HTMLElement {
    const unload = this._button('Unload', 'jp-LLM-unload', () => void this._unload(model.name),
      { 'aria-label': `unload ${model.name}` });
    unload.disabled = this._busy.has(`unload:${model.name}`);
    const o = model.options;
    return h('div', { class: 'jp-LLM-card', 'data-model': model.name },
      h('div', { class: 'jp-LLM-card-title' }, h('strong', {}, model.name), unload),
      h('div', { class: 'jp-LLM-caption' },
        `ctx ${model.n_ctx ?? o.n_ctx} · ${o.gpu_layers} GPU layers · KV ${o.kv_type}` +
        ` · pid ${model.pid} · ${expiry(model)}`),
      modelBars(model, visibleDevices(state.devices, this._settings.devices)), comparisonTable(model));
  }

  private _renderModels(state: IState | null): void {
    this._models.replaceChildren();
    this._names.replaceChildren();
    if (state === null) {
      return;
    }
    const loaded = new Set(state.loaded.map(m => m.name));
    for (const record of state.models) {
      const load = this._button('Load', 'jp-LLM-load-cached', () => {
        this._nameInput.value = record.name;
        void this._load(false);
      }, { 'aria-label': `load ${record.name}` });
      load.disabled = loaded.has(record.name) || this._busy.has(`load:${record.name}`);
      const summary = record.summary ?? {};
      const item = h('div', { class: 'jp-LLM-model', 'data-model': record.name },
        h('div', { class: 'jp-LLM-model-name', title: record.files[0] ?? '' }, record.name),
        h('div', { class: 'jp-LLM-caption' },
          [humanBytes(record.size), summary.quantization, summary.architecture, record.source]
            .filter(Boolean).join(' · ')),
        load);
      item.addEventListener('click', e => {
        if (e.target !== load) {
          this._nameInput.value = record.name;
          this._scheduleEstimate();
        }
      });
      this._models.append(item);
      this._names.append(h('option', { value: record.name }));
    }
    if (state.models.length === 0) {
      this._models.append(h('p', { class: 'jp-LLM-empty' }, 'No cached model yet: pull one below.'));
    }
    for (const alias of this._client?.aliases ?? []) {
      this._names.append(h('option', { value: alias.name }, alias.description));
    }
  }

  private _renderPulls(state: IState | null): void {
    this._pulls.replaceChildren();
    for (const pull of state?.pulls ?? []) {
      const progress = h('progress', { class: 'jp-LLM-progress', max: String(pull.total ?? 1) }) as HTMLProgressElement;
      if (pull.total) {
        progress.value = pull.completed;
      } else {
        progress.removeAttribute('value'); // indeterminate until the size is known
      }
      const amount = pull.total ? `${humanBytes(pull.completed)} / ${humanBytes(pull.total)}` : '';
      this._pulls.append(h('div', { class: 'jp-LLM-pull-item', 'data-pull': pull.name },
        h('div', { class: 'jp-LLM-caption' }, `${pull.name}: ${pull.status} ${amount}`), progress));
    }
  }

  private _renderServer(state: IState | null): void {
    this._server.replaceChildren();
    if (state === null) {
      return;
    }
    const server = state.server;
    if (server?.running) {
      const url = server.url;
      const token = server.token ?? '';
      const copy = this._button('Copy token', 'jp-LLM-copy-token', () => {
        Clipboard.copyToSystem(token);
        this._setMessage('info', 'API token copied to the clipboard');
      });
      copy.disabled = !token;
      this._server.append(
        h('div', { class: 'jp-LLM-caption jp-LLM-server-url' }, 'running at ',
          h('a', { href: url, target: '_blank', rel: 'noopener' }, url),
          ` · ${server.requests ?? 0} requests · ${token ? 'token required' : 'NO token'}`),
        h('div', { class: 'jp-LLM-actions' }, copy,
          this._button('Stop', 'jp-LLM-stop', () => void this._act('stop', {}, 'API server stopped')))
      );
    } else {
      const start = this._button('Start', 'jp-LLM-serve', () => {
        const text = this._portInput.value.trim();
        if (text !== '' && !/^\d+$/.test(text)) {
          this._setMessage('error', 'port: give a whole number (0 picks a free port), or leave it empty for 11434');
          return;
        }
        void this._act('serve', text === '' ? {} : { port: Number(text) }, 'API server started');
      });
      start.disabled = this._busy.has('serve');
      this._server.append(
        h('div', { class: 'jp-LLM-caption' },
          'Ollama- and OpenAI-compatible API on 127.0.0.1, token required.' +
          (server?.error ? ` Last error: ${server.error}` : '')),
        h('div', { class: 'jp-LLM-inline' }, this._portInput, start)
      );
    }
  }

  private _renderEstimate(): void {
    this._estimateBox.replaceChildren();
    const est = this._estimate;
    if (est === null) {
      return;
    }
    if (typeof est === 'string') {
      this._estimateBox.append(h('p', { class: 'jp-LLM-error' }, est));
      return;
    }
    this._estimateBox.classList.toggle('jp-LLM-wont-fit', !est.fits);
    for (const row of est.devices) {
      if (row.total <= 0) {
        continue;
      }
      this._estimateBox.append(h('div', { class: 'jp-LLM-caption' },
        `${row.device_id}: needs ${humanBytes(row.total)} of ${humanBytes(row.free)} free` +
        (row.fits ? '' : ' — will not fit')), bar(estimateSegments(row), row.fits));
    }
    const o = est.options;
    if (o) {
      this._estimateBox.append(h('div', { class: 'jp-LLM-caption' },
        `as loaded: ${o.gpu_layers} GPU layers, context ${o.n_ctx}`));
    }
    if (!est.fits && est.suggestion) {
      this._estimateBox.append(h('p', { class: 'jp-LLM-error' }, est.suggestion));
    }
  }

  // -- actions -------------------------------------------------------------------------------

  private _options(): ReturnType<typeof parseOptions> {
    return parseOptions({
      gpuLayers: this._gpuLayers.value, context: this._context.value, kvType: this._kvType.value,
      flashAttn: this._flashAttn.checked, parallel: this._parallel.value
    });
  }

  /** Re-price the load form shortly after the user stops typing (one request, not one per key). */
  private _scheduleEstimate(): void {
    window.clearTimeout(this._estimateTimer);
    this._estimateTimer = window.setTimeout(() => void this._runEstimate(), 150);
  }

  private async _runEstimate(): Promise<void> {
    const name = this._nameInput.value.trim();
    const options = this._options();
    const client = this._client;
    if (!name || client?.status !== 'attached' || !client.state?.models.some(m => m.name === name)) {
      this._estimate = typeof options === 'string' ? options : null;
      this._renderEstimate();
      return;
    }
    if (typeof options === 'string') {
      this._estimate = options;
      this._renderEstimate();
      return;
    }
    const ticket = ++this._estimateTicket;
    try {
      const est = await client.request<IEstimate>('estimate', { name, options });
      if (ticket === this._estimateTicket) {
        this._estimate = est;
      }
    } catch (error) {
      if (ticket === this._estimateTicket) {
        this._estimate = (error as Error).message;
      }
    }
    this._renderEstimate();
  }

  private async _load(force: boolean): Promise<void> {
    const name = this._nameInput.value.trim();
    const options = this._options();
    if (!name) {
      this._setMessage('error', 'Type a model name (or pick a cached one) to load.');
      return;
    }
    if (typeof options === 'string') {
      this._setMessage('error', options);
      return;
    }
    await this._act('load', { name, options, force }, `${name} loaded`, `load:${name}`);
  }

  private async _unload(name: string): Promise<void> {
    await this._act('unload', { name }, `${name} unloaded`, `unload:${name}`);
  }

  private async _pull(): Promise<void> {
    const name = this._pullInput.value.trim();
    if (!name) {
      this._setMessage('error', 'Type a model to pull, e.g. smollm2.');
      return;
    }
    await this._act('pull', { name }, `${name} pulled`, `pull:${name}`);
  }

  private async _act(action: 'pull' | 'load' | 'unload' | 'serve' | 'stop', args: { [k: string]: unknown },
    done: string, busyKey: string = action): Promise<void> {
    const client = this._client;
    if (client === null) {
      return;
    }
    this._busy.add(busyKey);
    this._setMessage('info', `${action}…`);
    try {
      await client.request(action, args);
      this._setMessage('info', done);
    } catch (error) {
      const e = error as RequestError;
      this._setMessage('error', e.message, action === 'load' && e.type === 'WontFitError');
    } finally {
      this._busy.delete(busyKey);
      this._render();
    }
  }

  private _onNotice(_: unknown, notice: INotice): void {
    if (notice.type === 'load_failed') {
      this._setMessage('error', `${notice.name}: ${notice.error}`);
    } else if (notice.type === 'unloaded' && notice.reason && notice.reason !== 'unloaded') {
      this._setMessage('info', `${notice.name}: ${notice.reason}`);
    }
  }

  private _setMessage(kind: 'info' | 'error', text: string, force = false): void {
    this._message = { kind, text, force };
    this._renderMessage();
  }

  private _client: LLMClient | null = null;
  private _label = '';
  private _settings: IPanelSettings = { refresh: 2, devices: [] };
  private _message: { kind: 'info' | 'error'; text: string; force: boolean } | null = null;
  private _estimate: IEstimate | string | null = null;
  private _estimateTimer = 0;
  private _estimateTicket = 0;
  private _busy = new Set<string>();
  private _kernelLabel!: HTMLElement;
  private _banner!: HTMLElement;
  private _messageBox!: HTMLElement;
  private _devices!: HTMLElement;
  private _loaded!: HTMLElement;
  private _models!: HTMLElement;
  private _pulls!: HTMLElement;
  private _server!: HTMLElement;
  private _estimateBox!: HTMLElement;
  private _names!: HTMLElement;
  private _nameInput!: HTMLInputElement;
  private _gpuLayers!: HTMLInputElement;
  private _context!: HTMLInputElement;
  private _parallel!: HTMLInputElement;
  private _kvType!: HTMLSelectElement;
  private _flashAttn!: HTMLInputElement;
  private _pullInput!: HTMLInputElement;
  private _portInput!: HTMLInputElement;
}
