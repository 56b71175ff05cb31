/**
 * The load form: a model name, the load options as typed, and the memory estimate of loading
 * that model with them. Built once, so typing is never interrupted; the panel asks the kernel
 * for the estimate and hands it back here to be drawn.
 */
import { estimateSegments, humanBytes, parseOptions } from './memory';
import { IEstimate, ILoadOptions } from './protocol';
import { bar, button, h } from './views';

/** Options for {@link LoadForm}. */
export interface ILoadFormOptions {
  /** The name or an option changed: the panel prices the load again. */
  changed: () => void;
  /** The Load button was pressed. */
  load: () => void;
  /** The name suggestions (the datalist `jp-LLM-names`, drawn with the cached models). */
  names: HTMLElement;
}

export class LoadForm {
  constructor(options: ILoadFormOptions) {
    const input = (name: string, value: string, label: string) => {
      const el = h('input', {
        class: `jp-LLM-input jp-LLM-${name}`,
        'aria-label': label
      }) as HTMLInputElement;
      el.value = value;
      return el;
    };
    this._name = h('input', {
      class: 'jp-LLM-input jp-LLM-load-name',
      placeholder: 'model name',
      list: 'jp-LLM-names',
      'aria-label': 'model to load'
    }) as HTMLInputElement;
    this._gpuLayers = input(
      'gpu-layers',
      'auto',
      'GPU layers (a number or auto)'
    );
    this._context = input(
      'ctx',
      '4096',
      'context in tokens (a number or auto)'
    );
    this._parallel = input('parallel', '1', 'parallel slots');
    this._kvType = h(
      'select',
      { class: 'jp-LLM-input jp-LLM-kv-type', 'aria-label': 'KV cache type' },
      ...['f16', 'q8_0', 'q4_0'].map(t => h('option', { value: t }, t))
    ) as HTMLSelectElement;
    this._flashAttn = h('input', {
      type: 'checkbox',
      class: 'jp-LLM-flash-attn'
    }) as HTMLInputElement;
    this._rpc = input(
      'rpc',
      '',
      'llama.cpp RPC servers (host:port, comma-separated)'
    );
    this._rpc.placeholder = 'host:port, … (trusted networks only)';
    // every estimate connects to the servers: price when the field is left, not on each key
    this._rpc.addEventListener('change', options.changed);
    for (const el of [
      this._name,
      this._gpuLayers,
      this._context,
      this._parallel,
      this._kvType,
      this._flashAttn
    ]) {
      el.addEventListener('input', options.changed);
      el.addEventListener('change', options.changed);
    }
    const row = (label: string, control: HTMLElement) =>
      h(
        'label',
        { class: 'jp-LLM-row' },
        h('span', { class: 'jp-LLM-row-label' }, label),
        control
      );
    this.nodes = [
      row('Model', this._name),
      options.names,
      row('GPU layers', this._gpuLayers),
      row('Context', this._context),
      row('KV cache', this._kvType),
      row('Flash attention', this._flashAttn),
      row('Parallel slots', this._parallel),
      row('RPC servers', this._rpc),
      this._estimate,
      h(
        'div',
        { class: 'jp-LLM-actions' },
        button('Load', 'jp-LLM-load', options.load)
      )
    ];
  }

  /** The form's rows, its estimate and its Load button, in order. */
  readonly nodes: HTMLElement[];

  /** The model name, as typed (trimmed). */
  get name(): string {
    return this._name.value.trim();
  }

  set name(value: string) {
    this._name.value = value;
  }

  /** The load options, or a message that says what to type instead. */
  options(): ILoadOptions | string {
    return parseOptions({
      gpuLayers: this._gpuLayers.value,
      context: this._context.value,
      kvType: this._kvType.value,
      flashAttn: this._flashAttn.checked,
      parallel: this._parallel.value,
      rpc: this._rpc.value
    });
  }

  /** Draw an estimate; a string is an error message, null shows nothing. */
  showEstimate(est: IEstimate | string | null): void {
    const box = this._estimate;
    box.replaceChildren();
    if (est === null) {
      return;
    }
    if (typeof est === 'string') {
      box.append(h('p', { class: 'jp-LLM-error' }, est));
      return;
    }
    box.classList.toggle('jp-LLM-wont-fit', !est.fits);
    for (const row of est.devices) {
      if (row.total <= 0) {
        continue;
      }
      box.append(
        h(
          'div',
          { class: 'jp-LLM-caption' },
          `${row.device_id}: needs ${humanBytes(row.total)} of ${humanBytes(row.free)} free` +
            (row.fits ? '' : ' — will not fit')
        ),
        bar(estimateSegments(row), row.fits)
      );
    }
    const o = est.options;
    if (o) {
      box.append(
        h(
          'div',
          { class: 'jp-LLM-caption' },
          `as loaded: ${o.gpu_layers} GPU layers, context ${o.n_ctx}`
        )
      );
    }
    if (!est.fits && est.suggestion) {
      box.append(h('p', { class: 'jp-LLM-error' }, est.suggestion));
    }
    for (const warning of est.warnings ?? []) {
      box.append(h('p', { class: 'jp-LLM-error jp-LLM-warning' }, warning));
    }
  }

  private _estimate = h('div', { class: 'jp-LLM-estimate' });
  private _name: HTMLInputElement;
  private _gpuLayers: HTMLInputElement;
  private _context: HTMLInputElement;
  private _parallel: HTMLInputElement;
  private _kvType: HTMLSelectElement;
  private _flashAttn: HTMLInputElement;
  private _rpc: HTMLInputElement;
}
