/**
 * The panel's sections that show the kernel's state: the enable banner, devices, loaded models,
 * cached models (with the load form's name suggestions), pulls and the API server. Each is
 * drawn from its slice alone (slices.ts), so it can be redrawn only when that slice changes;
 * its buttons call back into the panel, which owns the requests.
 */
import {
  IBannerSlice,
  IDeviceSlice,
  ILoadedSlice,
  IModelsSlice,
  IPullSlice,
  IRemoteSlice,
  SectionRenderers,
  ServerSlice
} from './slices';
import {
  button,
  comparisonTable,
  deviceView,
  h,
  legend,
  modelBars
} from './views';

/** What the sections' buttons ask the panel to do. */
export interface ISectionActions {
  /** Run `%load_ext jupyter_llm` in the kernel. */
  enable(): void;
  /** Put a cached model's name into the load form. */
  pick(name: string): void;
  /** Load a model with the load form's options. */
  load(name: string): void;
  unload(name: string): void;
  /** Start the API server on the port typed into {@link StateSections.port}. */
  serve(): void;
  stop(): void;
  copyToken(token: string): void;
}

/** The sections' elements and a renderer for each; the panel lays the elements out. */
export class StateSections {
  constructor(private readonly _actions: ISectionActions) {}

  readonly banner = h('div', { class: 'jp-LLM-banner' });
  readonly devices = h('div', { class: 'jp-LLM-devices' });
  readonly loaded = h('div', { class: 'jp-LLM-loaded' });
  readonly models = h('div', { class: 'jp-LLM-models' });
  /** The load form's suggestions: cached models, then the kernel's aliases. */
  readonly names = h('datalist', { id: 'jp-LLM-names' });
  readonly pulls = h('div', { class: 'jp-LLM-pulls' });
  readonly remotes = h('div', { class: 'jp-LLM-remotes' });
  readonly server = h('div', { class: 'jp-LLM-server' });
  /** The API server's port; one element kept across redraws, so what is typed stays. */
  readonly port = h('input', {
    class: 'jp-LLM-input jp-LLM-port',
    placeholder: 'port (11434)',
    'aria-label': 'API server port; 0 picks a free one'
  }) as HTMLInputElement;

  readonly renderers: SectionRenderers = {
    banner: slice => this._renderBanner(slice),
    devices: slice => this._renderDevices(slice),
    loaded: slice => this._renderLoaded(slice),
    models: slice => this._renderModels(slice),
    pulls: slice => this._renderPulls(slice),
    remotes: slice => this._renderRemotes(slice),
    server: slice => this._renderServer(slice)
  };

  private _renderBanner(slice: IBannerSlice | null): void {
    this.banner.replaceChildren();
    this.banner.hidden = slice === null;
    if (slice === null) {
      return;
    }
    const enable = button(
      'Load jupyter_llm in this kernel',
      'jp-LLM-enable',
      () => this._actions.enable()
    );
    enable.disabled = slice.enabling;
    this.banner.append(
      h(
        'p',
        {},
        'This kernel has not loaded jupyter_llm. Run ',
        h('code', {}, '%load_ext jupyter_llm'),
        ' in a cell (or add it to your IPython startup), or:'
      ),
      enable
    );
    if (slice.error) {
      this.banner.append(
        h(
          'p',
          { class: 'jp-LLM-error' },
          slice.error,
          ' — is jupyter_llm installed in this kernel’s environment? (pip install jupyter-llm)'
        )
      );
    }
  }

  private _renderDevices(slice: IDeviceSlice[] | null): void {
    this.devices.replaceChildren();
    if (slice === null) {
      return;
    }
    for (const device of slice) {
      this.devices.append(deviceView(device));
    }
    this.devices.append(legend());
  }

  private _renderLoaded(slice: ILoadedSlice[] | null): void {
    this.loaded.replaceChildren();
    if (slice === null) {
      return;
    }
    if (slice.length === 0) {
      this.loaded.append(
        h('p', { class: 'jp-LLM-empty' }, 'No model is loaded.')
      );
      return;
    }
    for (const model of slice) {
      const unload = button(
        'Unload',
        'jp-LLM-unload',
        () => this._actions.unload(model.name),
        { 'aria-label': `unload ${model.name}` }
      );
      unload.disabled = model.busy;
      this.loaded.append(
        h(
          'div',
          { class: 'jp-LLM-card', 'data-model': model.name },
          h(
            'div',
            { class: 'jp-LLM-card-title' },
            h('strong', {}, model.name),
            unload
          ),
          h('div', { class: 'jp-LLM-caption' }, model.caption),
          modelBars(model.shares),
          comparisonTable(model.comparison)
        )
      );
    }
  }

  private _renderModels(slice: IModelsSlice | null): void {
    this.models.replaceChildren();
    this.names.replaceChildren();
    if (slice === null) {
      return;
    }
    for (const record of slice.models) {
      const load = button(
        'Load',
        'jp-LLM-load-cached',
        () => this._actions.load(record.name),
        { 'aria-label': `load ${record.name}` }
      );
      load.disabled = record.disabled;
      const item = h(
        'div',
        { class: 'jp-LLM-model', 'data-model': record.name },
        h(
          'div',
          { class: 'jp-LLM-model-name', title: record.file },
          record.name
        ),
        h('div', { class: 'jp-LLM-caption' }, record.caption),
        load
      );
      item.addEventListener('click', e => {
        if (e.target !== load) {
          this._actions.pick(record.name);
        }
      });
      this.models.append(item);
      this.names.append(h('option', { value: record.name }));
    }
    if (slice.models.length === 0) {
      this.models.append(
        h(
          'p',
          { class: 'jp-LLM-empty' },
          'No cached model yet: pull one below.'
        )
      );
    }
    for (const alias of slice.aliases) {
      this.names.append(h('option', { value: alias.name }, alias.description));
    }
  }

  private _renderPulls(slice: IPullSlice[]): void {
    this.pulls.replaceChildren();
    for (const pull of slice) {
      const progress = h('progress', {
        class: 'jp-LLM-progress',
        max: String(pull.total ?? 1)
      }) as HTMLProgressElement;
      if (pull.total) {
        progress.value = pull.completed;
      } else {
        progress.removeAttribute('value'); // indeterminate until the size is known
      }
      this.pulls.append(
        h(
          'div',
          { class: 'jp-LLM-pull-item', 'data-pull': pull.name },
          h('div', { class: 'jp-LLM-caption' }, pull.caption),
          progress
        )
      );
    }
  }

  private _renderRemotes(slice: IRemoteSlice[]): void {
    this.remotes.replaceChildren();
    if (slice.length === 0) {
      this.remotes.append(
        h(
          'p',
          { class: 'jp-LLM-empty' },
          'No remote engines: ',
          h('code', {}, '%llm remote add NAME URL --api openai|ollama'),
          ' uses one; its models are NAME/MODEL.'
        )
      );
      return;
    }
    for (const remote of slice) {
      const item = h(
        'div',
        {
          class: `jp-LLM-remote${remote.failed ? ' jp-LLM-unreachable' : ''}`,
          'data-remote': remote.name
        },
        h('b', {}, remote.name),
        h('div', { class: 'jp-LLM-caption' }, remote.caption)
      );
      for (const model of remote.models) {
        item.append(
          h(
            'div',
            { class: 'jp-LLM-remote-model', 'data-model': model.name },
            h('code', {}, model.name),
            model.caption ? ` ${model.caption}` : ''
          )
        );
      }
      this.remotes.append(item);
    }
  }

  private _renderServer(slice: ServerSlice | null): void {
    this.server.replaceChildren();
    if (slice === null) {
      return;
    }
    if (slice.running) {
      const { url, token } = slice;
      const copy = button('Copy token', 'jp-LLM-copy-token', () =>
        this._actions.copyToken(token)
      );
      copy.disabled = !token;
      this.server.append(
        h(
          'div',
          { class: 'jp-LLM-caption jp-LLM-server-url' },
          'running at ',
          h('a', { href: url, target: '_blank', rel: 'noopener' }, url),
          ` · ${slice.requests} requests · ${token ? 'token required' : 'NO token'}`
        ),
        h(
          'div',
          { class: 'jp-LLM-actions' },
          copy,
          button('Stop', 'jp-LLM-stop', () => this._actions.stop())
        )
      );
    } else {
      const start = button('Start', 'jp-LLM-serve', () =>
        this._actions.serve()
      );
      start.disabled = slice.busy;
      this.server.append(
        h(
          'div',
          { class: 'jp-LLM-caption' },
          'Ollama- and OpenAI-compatible API on 127.0.0.1, token required.' +
            (slice.error ? ` Last error: ${slice.error}` : '')
        ),
        h('div', { class: 'jp-LLM-inline' }, this.port, start)
      );
    }
  }
}
