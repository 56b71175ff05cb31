/**
 * jupyter-llm: a left-sidebar panel showing the active notebook's kernel models, memory per
 * device, pulls and API server, talking to the kernel's manager over the comm `jupyter_llm`.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ISessionContext } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { LabIcon } from '@jupyterlab/ui-components';

import { LLMClient } from './client';
import { IKernelLike } from './kernel';
import { LLMPanel } from './panel';
import { DEFAULT_SETTINGS, IPanelSettings, panelSettings } from './settings';
import iconSvg from '../style/icons/llm.svg';

const PLUGIN_ID = 'jupyter-llm:plugin';
const PANEL_ID = 'jupyter-llm-sidebar';

export const llmIcon = new LabIcon({
  name: 'jupyter-llm:icon',
  svgstr: iconSvg
});

/**
 * Keeps one client for the kernel of the notebook the user is working in: a new notebook or a
 * new kernel means a new client; the same kernel keeps its client (and its comm).
 */
class KernelFollower {
  constructor(
    private readonly panel: LLMPanel,
    tracker: INotebookTracker
  ) {
    tracker.currentChanged.connect((_, widget) => this._follow(widget), this);
    this._follow(tracker.currentWidget);
  }

  settings: Readonly<IPanelSettings> = DEFAULT_SETTINGS;

  private _follow(widget: NotebookPanel | null): void {
    if (widget === null || widget.sessionContext === this._session) {
      return; // focus left the notebooks: keep showing the last one
    }
    this._session?.kernelChanged.disconnect(this._update, this);
    this._session?.propertyChanged.disconnect(this._update, this);
    this._session = widget.sessionContext;
    this._session.kernelChanged.connect(this._update, this);
    this._session.propertyChanged.connect(this._update, this);
    widget.disposed.connect(() => {
      if (this._session === widget.sessionContext) {
        this._session = null;
        this._setKernel(null, '');
      }
    });
    this._update();
  }

  private _update(): void {
    const session = this._session;
    const kernel = session?.session?.kernel ?? null;
    this._setKernel(
      kernel as unknown as IKernelLike | null,
      session?.path.split('/').pop() ?? ''
    );
  }

  private _setKernel(kernel: IKernelLike | null, label: string): void {
    const current = this.panel.client;
    if (
      current !== null &&
      kernel !== null &&
      current.kernel === kernel &&
      !current.isDisposed
    ) {
      this.panel.setClient(current, label); // a rename: same kernel, same comm
      return;
    }
    current?.dispose();
    const client =
      kernel && !kernel.isDisposed
        ? new LLMClient(kernel, { refresh: this.settings.refresh })
        : null;
    this.panel.setClient(client, label);
  }

  private _session: ISessionContext | null = null;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description:
    'Local language models of the active kernel: memory per device, pull, load, unload, serve.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ISettingRegistry, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    registry: ISettingRegistry | null,
    restorer: ILayoutRestorer | null
  ) => {
    const panel = new LLMPanel();
    panel.id = PANEL_ID;
    panel.title.icon = llmIcon;
    app.shell.add(panel, 'left', { rank: 650 });
    restorer?.add(panel, PANEL_ID);
    const follower = new KernelFollower(panel, tracker);

    app.commands.addCommand('jupyter-llm:open', {
      label: 'Show Local LLM Models',
      execute: () => app.shell.activateById(PANEL_ID)
    });

    if (registry) {
      registry
        .load(PLUGIN_ID)
        .then(settings => {
          const apply = () => {
            const value = panelSettings(key => settings.get(key).composite);
            follower.settings = value;
            panel.setSettings(value);
          };
          apply();
          settings.changed.connect(apply);
        })
        .catch(reason =>
          console.error('jupyter-llm: cannot load settings', reason)
        );
    }
  }
};

export default plugin;
