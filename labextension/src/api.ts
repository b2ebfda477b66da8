/**
 * The panel's calls to its own Jupyter server (`/jupyter-gpu/...`), which forwards them to the
 * gateway with a token the browser never sees.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** One GPU type of the pool, as `GET /api/gpu/types` lists it. */
export interface IGpuType {
  name: string;
  total: number;
  free: number;
  warm: number;
  queued: number;
  memory_mb: number | null;
  price_per_gpu_hour: number;
  emulated: boolean;
}

/** Live NVML figures of one leased GPU. */
export interface IGpuStatus {
  index: number;
  utilization: number;
  memory_used_mb: number;
  memory_total_mb: number;
}

/** What the gateway told the notebook about a lease before its end (GPU idleness, budgets). */
export interface INotice {
  seq: number;
  kind: string;
  text: string;
  at: number;
  when: number | null;
}

/** One of my leases, as the gateway describes it, plus the notebook path JupyterLab uses. */
export interface ILease {
  id: string;
  state: 'queued' | 'granted' | 'released';
  reason: string | null;
  gpu: string;
  gpu_type: string | null;
  count: number;
  gpu_indices: number[];
  kernel_id: string | null;
  queue_position: number | null;
  expected_wait: number;
  idle_timeout: number;
  idle_remaining: number | null;
  busy: boolean;
  notebook: string;
  notebook_path: string;
  granted_at: number | null;
  gpu_seconds: number;
  price_per_gpu_hour: number;
  cost: number;
  emulated: boolean;
  gpu_status: IGpuStatus[] | null;
  notices?: INotice[];
}

/** What one poll returns. */
export interface IState {
  gateway: string;
  types: IGpuType[];
  leases: ILease[];
}

/** A failed call, in words a person can act on. */
export class GpuApiError extends Error {
  constructor(
    message: string,
    readonly reason: string,
    readonly status: number
  ) {
    super(message);
  }
}

/** Call `/jupyter-gpu/<endpoint>` and return its JSON, or throw a `GpuApiError`. */
export async function requestAPI<T>(
  endpoint: string,
  init: RequestInit = {}
): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'jupyter-gpu', endpoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new GpuApiError(
      `the JupyterLab server does not answer (${String(error)})`,
      'server_unreachable',
      0
    );
  }
  const text = await response.text();
  let data: any = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    if (response.status === 404 && !data?.reason) {
      throw new GpuApiError(
        'the jupyter-gpu server extension is not enabled: run `jupyter server extension enable jupyter_gpu` and restart JupyterLab',
        'not_enabled',
        404
      );
    }
    throw new GpuApiError(
      data?.message ?? `${response.status} ${response.statusText}`,
      data?.reason ?? 'http_error',
      response.status
    );
  }
  return data as T;
}
