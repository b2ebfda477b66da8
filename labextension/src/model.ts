/**
 * The pool as the panel and the status bar see it: polled from the server with backoff, paused
 * while nobody can see it, and ticked locally between polls so ages and costs run smoothly.
 */
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import {
  GpuApiError,
  IBudget,
  IGpuType,
  ILease,
  IState,
  requestAPI
} from './api';

/** Poll intervals (ms): quick while the panel is open, slow when only the status bar shows. */
const FAST = 2000;
const SLOW = 10000;
const MAX_BACKOFF = 30000;

export class GpuModel {
  constructor() {
    this._poll = new Poll({
      auto: false,
      factory: () => this._refresh(),
      frequency: { interval: SLOW, backoff: true, max: MAX_BACKOFF },
      name: 'jupyter-gpu:state',
      standby: () => document.hidden || !(this._panelVisible || this._watched)
    });
    this._ticker = window.setInterval(() => {
      if (this.polledAt && !document.hidden && (this._panelVisible || this._watched)) {
        this._changed.emit();
      }
    }, 1000);
    void this._poll.start();
  }

  /** Emitted after each poll, each local tick, and each error. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  types: IGpuType[] = [];
  leases: ILease[] = [];
  budgets: IBudget[] = [];
  gateway = '';
  /** The last failure, cleared by the next successful poll. */
  error: GpuApiError | null = null;
  /** `Date.now()` of the last successful poll; 0 before the first. */
  polledAt = 0;

  /** The sidebar panel is shown: poll often. */
  set panelVisible(visible: boolean) {
    if (visible === this._panelVisible) {
      return;
    }
    this._panelVisible = visible;
    this._poll.frequency = {
      ...this._poll.frequency,
      interval: visible ? FAST : SLOW
    };
    if (visible) {
      void this.refresh();
    }
  }

  /** Something besides the panel (the status bar of an open notebook) wants fresh data. */
  set watched(watched: boolean) {
    if (watched !== this._watched) {
      this._watched = watched;
      if (watched) {
        void this.refresh();
      }
    }
  }

  /** Poll now, e.g. after an action or when the user asks to retry. */
  async refresh(): Promise<void> {
    await this._poll.refresh();
    await this._poll.tick;
  }

  /** Seconds since the last poll: the local tick that keeps figures moving between polls. */
  sincePoll(): number {
    return this.polledAt ? Math.max(0, (Date.now() - this.polledAt) / 1000) : 0;
  }

  /** How long the lease has held its GPUs, counted on the gateway's clock. */
  age(lease: ILease): number {
    if (lease.state !== 'granted') {
      return 0;
    }
    return lease.gpu_seconds / Math.max(1, lease.count) + this.sincePoll();
  }

  gpuSeconds(lease: ILease): number {
    return lease.state === 'granted'
      ? lease.gpu_seconds + lease.count * this.sincePoll()
      : lease.gpu_seconds;
  }

  cost(lease: ILease): number {
    return lease.state === 'granted'
      ? lease.cost +
          (lease.count * this.sincePoll() * lease.price_per_gpu_hour) / 3600
      : lease.cost;
  }

  /** Seconds until the lease is released for idleness (null while not granted). */
  idleRemaining(lease: ILease): number | null {
    if (lease.idle_remaining === null) {
      return null;
    }
    return lease.busy
      ? lease.idle_remaining
      : Math.max(0, lease.idle_remaining - this.sincePoll());
  }

  /** The live lease of a notebook (JupyterLab path), if any. */
  leaseFor(path: string): ILease | undefined {
    return this.leases.find(
      lease => lease.notebook_path === path && lease.state !== 'released'
    );
  }

  async release(lease: ILease): Promise<void> {
    try {
      await requestAPI<ILease>(`leases/${encodeURIComponent(lease.id)}`, {
        method: 'DELETE'
      });
    } finally {
      await this.refresh();
    }
  }

  dispose(): void {
    window.clearInterval(this._ticker);
    this._poll.dispose();
    Signal.clearData(this);
  }

  private async _refresh(): Promise<void> {
    try {
      const state = await requestAPI<IState>('state');
      this.types = state.types;
      this.leases = state.leases.filter(lease => lease.state !== 'released');
      this.budgets = state.budgets ?? [];
      this.gateway = state.gateway;
      this.polledAt = Date.now();
      this.error = null;
    } catch (error) {
      this.error =
        error instanceof GpuApiError
          ? error
          : new GpuApiError(String(error), 'unknown', 0);
      this._changed.emit();
      throw error; // the poll backs off until the gateway answers again
    }
    this._changed.emit();
  }

  private _poll: Poll;
  private _ticker: number;
  private _panelVisible = false;
  private _watched = false;
  private _changed = new Signal<this, void>(this);
}

/** `42s`, `3m12s`, `1h05m`. */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) {
    return `${s}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  }
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

export function formatCost(dollars: number): string {
  return `$${dollars.toFixed(2)}`;
}

/** A budget's amount in its unit: `2 GPUs`, `1.50 GPU-h`, `$12.00`. */
export function formatBudgetAmount(budget: IBudget, value: number): string {
  if (budget.budget === 'money_per_month') {
    return formatCost(value);
  }
  if (budget.budget === 'gpus') {
    return `${Math.round(value)} GPU${Math.round(value) === 1 ? '' : 's'}`;
  }
  return `${value < 0.1 && value > 0 ? value.toPrecision(2) : value.toFixed(2)} GPU-h`;
}

/** What a budget is, in words: `GPU-hours today`. */
export const BUDGET_LABELS: Record<IBudget['budget'], string> = {
  gpus: 'GPUs at once',
  gpu_hours_per_day: 'GPU-hours today',
  money_per_month: 'money this month'
};

/** What the status bar shows for a notebook's lease: `a100 · 3m12s · $0.12`. */
export function leaseSummary(model: GpuModel, lease: ILease): string {
  const type = `${lease.gpu_type ?? lease.gpu}${lease.count > 1 ? ` ×${lease.count}` : ''}`;
  if (lease.state === 'queued') {
    return `${lease.gpu} · queued #${lease.queue_position ?? '?'}`;
  }
  return `${type} · ${formatDuration(model.age(lease))} · ${formatCost(model.cost(lease))}`;
}
