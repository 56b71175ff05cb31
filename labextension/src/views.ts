/**
 * DOM pieces of the panel that depend only on what they are given: the element builder, a
 * button, stacked bars, the legend, a device row, a loaded model's bars and its
 * predicted-vs-measured table. `h()` sets text and attributes only (never HTML), so names that
 * come from remote registries stay inert.
 */
import {
  humanBytes,
  IComparisonRow,
  IModelShare,
  ISegment,
  percent
} from './memory';
import { IDeviceSlice } from './slices';

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

/** A styled button with the class `cls` that calls `onClick`. */
export function button(
  text: string,
  cls: string,
  onClick: () => void,
  attrs: { [key: string]: string } = {}
): HTMLButtonElement {
  const el = h(
    'button',
    {
      class: `jp-Button jp-mod-styled jp-LLM-button ${cls}`,
      type: 'button',
      ...attrs
    },
    text
  ) as HTMLButtonElement;
  el.addEventListener('click', onClick);
  return el;
}

/** A stacked bar; `fits === false` marks it red. */
export function bar(segments: ISegment[], fits = true): HTMLElement {
  const el = h('div', {
    class: 'jp-LLM-bar' + (fits ? '' : ' jp-LLM-bar-over')
  });
  for (const s of segments) {
    const part = h('span', {
      class: `jp-LLM-seg jp-LLM-seg-${s.kind}`,
      title: s.label
    });
    part.style.width = `${(s.fraction * 100).toFixed(2)}%`;
    el.append(part);
  }
  return el;
}

export function legend(): HTMLElement {
  const item = (kind: string, text: string) =>
    h(
      'span',
      { class: 'jp-LLM-legend-item' },
      h('span', { class: `jp-LLM-swatch jp-LLM-seg-${kind}` }),
      text
    );
  return h(
    'div',
    { class: 'jp-LLM-legend' },
    item('weights', 'weights'),
    item('kv', 'KV cache'),
    item('compute', 'graph'),
    item('other', 'other'),
    item('free', 'free')
  );
}

/** A device: its name, a bar of every loaded model's buffers, other processes and free memory. */
export function deviceView(device: IDeviceSlice): HTMLElement {
  const used = device.total - device.free;
  return h(
    'div',
    { class: 'jp-LLM-device', 'data-device': device.id },
    h(
      'div',
      { class: 'jp-LLM-device-name', title: device.name },
      `${device.id} · ${device.name}`
    ),
    bar(device.segments),
    h(
      'div',
      { class: 'jp-LLM-caption' },
      `${humanBytes(device.free)} free of ${humanBytes(device.total)} (${humanBytes(used)} used)`
    )
  );
}

/** One bar per device a loaded model uses: weights / KV / graph as shares of what it holds. */
export function modelBars(shares: IModelShare[]): HTMLElement {
  const bars = h('div', { class: 'jp-LLM-model-bars' });
  for (const share of shares) {
    bars.append(
      h(
        'div',
        { class: 'jp-LLM-caption' },
        `${share.device}: ${humanBytes(share.held)}`
      ),
      bar(share.segments)
    );
  }
  return bars;
}

/** Predicted against measured per device, with the error. */
export function comparisonTable(rows: IComparisonRow[]): HTMLElement {
  const cells = (tag: string, ...texts: string[]) =>
    h('tr', {}, ...texts.map(text => h(tag, {}, text)));
  const table = h(
    'table',
    { class: 'jp-LLM-compare' },
    cells('th', 'device', 'predicted', 'measured', 'error')
  );
  for (const row of rows) {
    table.append(
      cells(
        'td',
        row.device,
        humanBytes(row.predicted),
        humanBytes(row.measured),
        percent(row.error)
      )
    );
  }
  return table;
}
