/**
 * DOM pieces of the panel that depend only on the state they draw: the element builder, stacked
 * bars, the legend, a device row, a loaded model's bars and its predicted-vs-measured table.
 */
import {
  compareModel,
  deviceSegments,
  humanBytes,
  ISegment,
  percent
} from './memory';
import { IDevice, ILoadedModel } from './protocol';

/** A tiny element builder: `h('div', {class: 'x'}, child, 'text')`. */
export function h(
  tag: string,
  attrs: { [key: string]: string | boolean | undefined } = {},
  ...children: (Node | string | null)[]
): HTMLElement {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) {
      continue;
    }
    el.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children) {
    if (child !== null) {
      el.append(child);
    }
  }
  return el;
}

/** A stacked bar; `fits === false` marks it red. */
export function bar(segments: ISegment[], fits = true): HTMLElement {
  const el = h('div', { class: 'jp-LLM-bar' + (fits ? '' : ' jp-LLM-bar-over') });
  for (const s of segments) {
    const part = h('span', { class: `jp-LLM-seg jp-LLM-seg-${s.kind}`, title: s.label });
    part.style.width = `${(s.fraction * 100).toFixed(2)}%`;
    el.append(part);
  }
  return el;
}

export function legend(): HTMLElement {
  const item = (kind: string, text: string) =>
    h('span', { class: 'jp-LLM-legend-item' }, h('span', { class: `jp-LLM-swatch jp-LLM-seg-${kind}` }), text);
  return h('div', { class: 'jp-LLM-legend' }, item('weights', 'weights'), item('kv', 'KV cache'),
    item('compute', 'graph'), item('other', 'other'), item('free', 'free'));
}

/** A device: its name, a bar of every loaded model's buffers, other processes and free memory. */
export function deviceView(device: IDevice, loaded: ILoadedModel[]): HTMLElement {
  const used = device.total_bytes - device.free_bytes;
  return h('div', { class: 'jp-LLM-device', 'data-device': device.id },
    h('div', { class: 'jp-LLM-device-name', title: device.name }, `${device.id} · ${device.name}`),
    bar(deviceSegments(device, loaded)),
    h('div', { class: 'jp-LLM-caption' },
      `${humanBytes(device.free_bytes)} free of ${humanBytes(device.total_bytes)} (${humanBytes(used)} used)`));
}

/** One bar per device the model uses: weights / KV / graph as shares of what it holds there. */
export function modelBars(model: ILoadedModel, devices: IDevice[]): HTMLElement {
  const bars = h('div', { class: 'jp-LLM-model-bars' });
  for (const device of devices) {
    const segments = deviceSegments(device, [model]).filter(s => s.kind !== 'other' && s.kind !== 'free');
    if (segments.length > 0) {
      const held = segments.reduce((sum, s) => sum + s.bytes, 0);
      bars.append(h('div', { class: 'jp-LLM-caption' }, `${device.id}: ${humanBytes(held)}`),
        bar(segments.map(s => ({ ...s, fraction: held > 0 ? s.bytes / held : 0 }))));
    }
  }
  return bars;
}

/** Predicted against measured per device, with the error. */
export function comparisonTable(model: ILoadedModel): HTMLElement {
  const table = h('table', { class: 'jp-LLM-compare' },
    h('tr', {}, h('th', {}, 'device'), h('th', {}, 'predicted'), h('th', {}, 'measured'), h('th', {}, 'error')));
  for (const row of compareModel(model)) {
    table.append(h('tr', {}, h('td', {}, row.device), h('td', {}, humanBytes(row.predicted)),
      h('td', {}, humanBytes(row.measured)), h('td', {}, percent(row.error))));
  }
  return table;
}
