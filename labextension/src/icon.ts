import { LabIcon } from '@jupyterlab/ui-components';

import gpuSvg from '../style/gpu.svg';

/** A chip with pins; `jp-icon3` makes it follow the theme's icon colour. */
export const gpuIcon = new LabIcon({ name: 'jupyter-gpu:gpu', svgstr: gpuSvg });
