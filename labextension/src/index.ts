/**
 * jupyter-gpu for JupyterLab: a GPU sidebar, a "Run cell on GPU" command and a status bar item.
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';

import { requestAPI } from './api';
import { gpuIcon } from './icon';
import { GpuModel } from './model';
import { GpuPanel } from './panel';
import { runCellOnGpu } from './runcell';
import { GpuStatus } from './status';

const PLUGIN_ID = 'jupyter-gpu:plugin';
const RUN_CELL = 'jupyter-gpu:run-cell';

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description:
    'GPU sidebar, "Run cell on GPU" and the status bar item of jupyter-gpu.',
  autoStart: true,
  requires: [INotebookTracker, ISettingRegistry],
  optional: [ICommandPalette, IStatusBar, ILabShell, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    settingRegistry: ISettingRegistry,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null,
    labShell: ILabShell | null,
    restorer: ILayoutRestorer | null
  ) => {
    const model = new GpuModel();
    let settings: ISettingRegistry.ISettings | null = null;
    let defaultType = 'any';

    /** The setting reaches `%%gpu` through a file the server extension writes. */
    const shareDefault = async (gpuType: string) => {
      try {
        await requestAPI('default-type', {
          method: 'PUT',
          body: JSON.stringify({ gpu_type: gpuType })
        });
      } catch (error) {
        Notification.error(
          `The default GPU type did not reach %%gpu: ${(error as Error).message}`,
          { autoClose: 8000 }
        );
      }
    };

    const panel = new GpuPanel({
      model,
      getDefaultType: () => defaultType,
      setDefaultType: gpuType => {
        if (settings) {
          void settings.set('defaultType', gpuType);
        } else {
          defaultType = gpuType;
          void shareDefault(gpuType);
          panel.update();
        }
      },
      openNotebook: path =>
        void app.commands.execute('docmanager:open', { path })
    });
    app.shell.add(panel, 'left', { rank: 650 });
    restorer?.add(panel, panel.id);

    const currentPanel = (): NotebookPanel | null => {
      const current = tracker.currentWidget;
      return current && app.shell.currentWidget === current ? current : null;
    };

    app.commands.addCommand(RUN_CELL, {
      label: args => (args.toolbar ? '' : 'Run cell on GPU'),
      caption: () =>
        `Run the active cell with %%gpu ${defaultType} (the cell's source stays as it is)`,
      icon: gpuIcon,
      isEnabled: () =>
        tracker.currentWidget?.content.activeCell?.model.type === 'code',
      execute: async () => {
        const notebook = tracker.currentWidget;
        if (!notebook) {
          return;
        }
        // The lease appears as soon as the cell starts: show it without waiting for a poll.
        const early = window.setTimeout(
          () => void model.refresh().catch(() => undefined),
          1500
        );
        try {
          const problem = await runCellOnGpu(notebook, defaultType);
          if (problem) {
            Notification.warning(`Run cell on GPU: ${problem}`, {
              autoClose: 8000
            });
          }
        } finally {
          window.clearTimeout(early);
          void model.refresh().catch(() => undefined);
        }
      }
    });
    palette?.addItem({ command: RUN_CELL, category: 'Notebook Operations' });
    tracker.activeCellChanged.connect(() =>
      app.commands.notifyCommandChanged(RUN_CELL)
    );

    if (statusBar) {
      const status = new GpuStatus(
        model,
        () => currentPanel()?.context.path ?? null
      );
      statusBar.registerStatusItem('jupyter-gpu:status', {
        item: status,
        align: 'left',
        rank: 4,
        isActive: () => status.isActive(),
        activeStateChanged: status.activeStateChanged
      });
      const changed = () => status.currentChanged();
      tracker.currentChanged.connect(changed);
      labShell?.currentChanged.connect(changed);
    }

    const applySettings = (loaded: ISettingRegistry.ISettings) => {
      defaultType = (loaded.get('defaultType').composite as string) || 'any';
      void shareDefault(defaultType);
      app.commands.notifyCommandChanged(RUN_CELL);
      panel.update();
    };
    settingRegistry
      .load(PLUGIN_ID)
      .then(loaded => {
        settings = loaded;
        applySettings(loaded);
        loaded.changed.connect(applySettings);
      })
      .catch(error =>
        console.warn('jupyter-gpu: settings not loaded, using "any"', error)
      );

    document.addEventListener('visibilitychange', () => {
      if (!document.hidden) {
        void model.refresh().catch(() => undefined);
      }
    });
  }
};

export default plugin;
