/**
 * The GPU sidebar: what the pool offers, what I hold and what it costs, and my default type.
 */
import {
  Button,
  HTMLSelect,
  ReactWidget,
  refreshIcon,
  UseSignal
} from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import * as React from 'react';

import { IGpuType, ILease } from './api';
import { gpuIcon } from './icon';
import { formatCost, formatDuration, GpuModel } from './model';

export interface IPanelOptions {
  model: GpuModel;
  /** The current default type for `%%gpu` without a SPEC. */
  getDefaultType: () => string;
  setDefaultType: (gpuType: string) => void;
  /** Open a notebook by its JupyterLab path. */
  openNotebook: (path: string) => void;
}

export class GpuPanel extends ReactWidget {
  constructor(private _options: IPanelOptions) {
    super();
    this.id = 'jupyter-gpu-panel';
    this.addClass('jp-GpuPanel');
    this.title.icon = gpuIcon;
    this.title.caption = 'GPUs';
  }

  render(): JSX.Element {
    const { model } = this._options;
    return (
      <UseSignal signal={model.changed}>
        {() => <PanelBody {...this._options} />}
      </UseSignal>
    );
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._options.model.panelVisible = true;
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this._options.model.panelVisible = false;
  }
}

function PanelBody(props: IPanelOptions): JSX.Element {
  const { model } = props;
  const names = model.types.map(t => t.name);
  const chosen = props.getDefaultType();
  const options = ['any', ...names];
  if (!options.includes(chosen)) {
    options.push(chosen);
  }
  return (
    <div className="jp-GpuPanel-body">
      <header className="jp-GpuPanel-header">
        <h2>GPUs</h2>
        <Button
          minimal
          small
          title="Refresh now"
          aria-label="Refresh"
          onClick={() => void model.refresh().catch(() => undefined)}
        >
          <refreshIcon.react tag="span" />
        </Button>
      </header>
      {model.error && (
        <div className="jp-GpuPanel-error" role="alert">
          <p>{model.error.message}</p>
          <p className="jp-GpuPanel-muted">
            Retrying by itself
            {model.polledAt ? '; the figures below may be out of date' : ''}.
          </p>
        </div>
      )}
      <section aria-label="GPU types">
        <h3>Types</h3>
        {model.types.length ? (
          <TypesList types={model.types} />
        ) : (
          <p className="jp-GpuPanel-muted">
            {model.error || !model.polledAt ? '…' : 'The gateway offers no type.'}
          </p>
        )}
      </section>
      <section className="jp-GpuPanel-default" aria-label="Default type">
        <label htmlFor="jp-GpuPanel-defaultType">
          Default for <code>%%gpu</code>
        </label>
        <HTMLSelect
          id="jp-GpuPanel-defaultType"
          className="jp-GpuPanel-select"
          value={chosen}
          onChange={event => props.setDefaultType(event.currentTarget.value)}
          options={options}
        />
      </section>
      <section aria-label="My leases">
        <h3>My leases</h3>
        {model.leases.length ? (
          <ul className="jp-GpuPanel-leases">
            {model.leases.map(lease => (
              <LeaseItem key={lease.id} lease={lease} {...props} />
            ))}
          </ul>
        ) : (
          <p className="jp-GpuPanel-muted">
            No GPU held. Put <code>%%gpu</code> on a cell, or use “Run cell on
            GPU”.
          </p>
        )}
      </section>
      {model.gateway && (
        <footer className="jp-GpuPanel-muted" title="gateway">
          {model.gateway}
        </footer>
      )}
    </div>
  );
}

function TypesList(props: { types: IGpuType[] }): JSX.Element {
  return (
    <ul className="jp-GpuPanel-types">
      {props.types.map(t => (
        <li key={t.name} data-gpu-type={t.name} className="jp-GpuPanel-type">
          <div className="jp-GpuPanel-row">
            <span>
              <span className="jp-GpuPanel-typeName">{t.name}</span>
              {t.emulated && (
                <span
                  className="jp-GpuPanel-badge"
                  title="declared in the gateway's inventory, not a real GPU"
                >
                  emulated
                </span>
              )}
            </span>
            <span title="free / total">
              <span className="jp-GpuPanel-free">
                {t.free}/{t.total}
              </span>{' '}
              free
            </span>
          </div>
          <div
            className="jp-GpuPanel-meter"
            role="meter"
            aria-label={`${t.name} free`}
            aria-valuemin={0}
            aria-valuemax={t.total}
            aria-valuenow={t.free}
          >
            <div style={{ width: `${t.total ? (100 * t.free) / t.total : 0}%` }} />
          </div>
          <div className="jp-GpuPanel-muted jp-GpuPanel-typeFigures">
            {t.warm} warm · {t.queued} queued ·{' '}
            {formatCost(t.price_per_gpu_hour)}/h
          </div>
        </li>
      ))}
    </ul>
  );
}

function LeaseItem(props: IPanelOptions & { lease: ILease }): JSX.Element {
  const { lease, model } = props;
  const [releasing, setReleasing] = React.useState(false);
  const [failure, setFailure] = React.useState('');
  const path = lease.notebook_path || lease.notebook;
  const where = path ? path.split('/').pop() : 'outside a notebook';
  const idle = model.idleRemaining(lease);
  const type = lease.gpu_type ?? lease.gpu;
  const indices = lease.gpu_indices.length
    ? ` · GPU ${lease.gpu_indices.join(',')}`
    : '';
  const release = async () => {
    setReleasing(true);
    setFailure('');
    try {
      await model.release(lease);
    } catch (error) {
      setFailure(String((error as Error).message ?? error));
      setReleasing(false);
    }
  };
  return (
    <li className="jp-GpuPanel-lease" data-lease-id={lease.id}>
      <div className="jp-GpuPanel-leaseHead">
        {lease.notebook_path ? (
          <a
            className="jp-GpuPanel-notebook"
            title={`${lease.notebook_path}: open it`}
            href="#"
            onClick={event => {
              event.preventDefault();
              props.openNotebook(lease.notebook_path);
            }}
          >
            {where}
          </a>
        ) : (
          <span className="jp-GpuPanel-notebook" title={lease.notebook}>
            {where}
          </span>
        )}
        <Button
          small
          className="jp-GpuPanel-release"
          disabled={releasing}
          title="End this lease now: the GPU goes back to the pool"
          onClick={() => void release()}
        >
          {releasing ? 'Releasing…' : 'Release'}
        </Button>
      </div>
      <div className="jp-GpuPanel-leaseType">
        <strong>{type}</strong>
        {lease.count > 1 ? ` ×${lease.count}` : ''}
        {indices}
        {lease.emulated && <span className="jp-GpuPanel-badge">emulated</span>}
      </div>
      {lease.state === 'queued' ? (
        <dl className="jp-GpuPanel-figures">
          <dt>queued</dt>
          <dd>
            #{lease.queue_position ?? '?'}, about{' '}
            {formatDuration(lease.expected_wait)}
          </dd>
        </dl>
      ) : (
        <dl className="jp-GpuPanel-figures">
          <dt>age</dt>
          <dd className="jp-GpuPanel-age">{formatDuration(model.age(lease))}</dd>
          <dt>idle left</dt>
          <dd>
            {lease.busy
              ? 'running'
              : idle === null
                ? 'n/a'
                : formatDuration(idle)}
          </dd>
          <dt>GPU-seconds</dt>
          <dd>{model.gpuSeconds(lease).toFixed(1)}</dd>
          <dt>cost</dt>
          <dd className="jp-GpuPanel-cost">{formatCost(model.cost(lease))}</dd>
          <dt>utilization</dt>
          <dd className="jp-GpuPanel-util">{utilization(lease)}</dd>
          <dt>memory</dt>
          <dd className="jp-GpuPanel-mem">{memory(lease)}</dd>
        </dl>
      )}
      {lease.notices?.length ? (
        <p className="jp-GpuPanel-notice" role="status">
          {lease.notices[lease.notices.length - 1].text}
        </p>
      ) : null}
      {failure && (
        <p className="jp-GpuPanel-error" role="alert">
          {failure}
        </p>
      )}
    </li>
  );
}

function utilization(lease: ILease): string {
  if (!lease.gpu_status?.length) {
    return 'n/a';
  }
  return lease.gpu_status.map(s => `${s.utilization}%`).join(' ');
}

function memory(lease: ILease): string {
  if (!lease.gpu_status?.length) {
    return 'n/a';
  }
  return lease.gpu_status
    .map(
      s =>
        `${(s.memory_used_mb / 1024).toFixed(1)}/${(s.memory_total_mb / 1024).toFixed(0)} GB`
    )
    .join(' ');
}
