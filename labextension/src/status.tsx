/**
 * The status bar item: the current notebook's lease (`a100 · 3m12s · $0.12`), or nothing.
 */
import { TextItem } from '@jupyterlab/statusbar';
import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import { ISignal, Signal } from '@lumino/signaling';
import * as React from 'react';

import { GpuModel, leaseSummary } from './model';

export class GpuStatus extends ReactWidget {
  constructor(
    private _model: GpuModel,
    private _currentPath: () => string | null
  ) {
    super();
    this.addClass('jp-GpuStatus');
    _model.changed.connect(this._update, this);
  }

  /** Whether the current notebook holds a lease (the status bar hides the item otherwise). */
  isActive(): boolean {
    const path = this._currentPath();
    return path !== null && this._model.leaseFor(path) !== undefined;
  }

  get activeStateChanged(): ISignal<this, void> {
    return this._activeStateChanged;
  }

  /** The current notebook changed: show its lease, if any. */
  currentChanged(): void {
    this._update();
    this.update();
  }

  render(): JSX.Element {
    return (
      <UseSignal signal={this._model.changed}>
        {() => {
          const path = this._currentPath();
          const lease = path === null ? undefined : this._model.leaseFor(path);
          if (!lease) {
            return <></>;
          }
          this.node.title = `${path} holds ${lease.gpu_type ?? lease.gpu} (${
            lease.state
          }); open the GPU panel for details`;
          return <TextItem source={leaseSummary(this._model, lease)} />;
        }}
      </UseSignal>
    );
  }

  private _update(): void {
    const active = this.isActive();
    this._model.watched = this._currentPath() !== null;
    if (active !== this._active) {
      this._active = active;
      this._activeStateChanged.emit();
    }
  }

  private _active = false;
  private _activeStateChanged = new Signal<this, void>(this);
}
