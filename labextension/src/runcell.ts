/**
 * "Run cell on GPU": run the active cell as if `%%gpu <default>` stood on top of it, without
 * touching its source, so the notebook stays runnable on a CPU as it is.
 */
import { CodeCell } from '@jupyterlab/cells';
import { NotebookPanel } from '@jupyterlab/notebook';
import { OutputArea } from '@jupyterlab/outputarea';
import { KernelMessage } from '@jupyterlab/services';

/** Loads the magic quietly; a second load is a no-op that prints nothing (unlike `%load_ext`). */
const LOAD_MAGIC =
  "get_ipython().extension_manager.load_extension('jupyter_gpu')";

const HAS_MAGIC = /^\s*%%gpu\b/;

/** The code the kernel runs: the cell itself when it already says `%%gpu`, else with it on top. */
export function gpuCode(source: string, defaultType: string): string {
  return HAS_MAGIC.test(source)
    ? source
    : `%%gpu ${defaultType}\n${source}`;
}

/** Why a cell cannot run on a GPU, in words; null when it can. */
export async function runCellOnGpu(
  panel: NotebookPanel,
  defaultType: string
): Promise<string | null> {
  const cell = panel.content.activeCell;
  if (!(cell instanceof CodeCell)) {
    return 'select a code cell to run it on a GPU';
  }
  const model = cell.model;
  const source = model.sharedModel.getSource();
  if (!source.trim()) {
    return null;
  }
  const sessionContext = panel.sessionContext;
  await sessionContext.ready;
  const kernel = sessionContext.session?.kernel;
  if (!kernel) {
    return 'this notebook has no kernel: start one, then run the cell on a GPU';
  }
  const loaded = await kernel.requestExecute({
    code: LOAD_MAGIC,
    silent: true,
    store_history: false
  }).done;
  if (loaded.content.status !== 'ok') {
    const detail =
      loaded.content.status === 'error'
        ? `${loaded.content.ename}: ${loaded.content.evalue}`
        : loaded.content.status;
    return `the %%gpu magic does not load in this notebook's kernel (${detail}): install jupyter-gpu into the kernel's environment`;
  }
  model.sharedModel.transact(
    () => {
      model.clearExecution();
      cell.outputHidden = false;
    },
    false,
    'silent-change'
  );
  model.executionState = 'running';
  model.trusted = true;
  let reply: KernelMessage.IExecuteReplyMsg | undefined;
  try {
    reply = await OutputArea.execute(
      gpuCode(source, defaultType),
      cell.outputArea,
      sessionContext,
      { ...model.metadata, cellId: model.sharedModel.getId() }
    );
  } finally {
    if (!cell.isDisposed) {
      model.executionState = 'idle';
    }
  }
  if (reply && !cell.isDisposed) {
    model.executionCount = reply.content.execution_count;
  }
  return null;
}
