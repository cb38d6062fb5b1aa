"""Draw mae.py's five --mask_type options side by side: benchmarks/gallery/mask_types.png.

Columns: random (MAE), red, blue, green, purple (ColorMAE); rows: samples (generators seeded 0, 1, ...). Each cell is
the 14 x 14 patch grid of a 224 px ViT-B/16 at mask ratio 0.75: black = masked (removed), white = visible, exactly 49
visible patches each. The masks are those the data loader draws (mae.mask_drawer), put through mae.random_masking.

    python benchmarks/mask_types.py [--grid 14] [--rows 4] [--out benchmarks/gallery/mask_types.png]
"""
import os, sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common, mae  # noqa: E402


def main(argv=None):
    parser = common.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--grid', type=int, default=14, help='patch grid side (14: 224 px with 16 px patches)')
    parser.add_argument('--rows', type=int, default=4, help='samples per mask type')
    parser.add_argument('--mask_ratio', type=float, default=0.75, help='fraction of patches masked')
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'gallery', 'mask_types.png'))
    opts = parser.parse_args(argv)
    columns = []
    for mask_type in ['random', *mae.COLORS]:
        draw = mae.mask_drawer(mask_type, opts.grid)
        noise = torch.from_numpy(np.stack([draw(np.random.default_rng([0, i])) for i in range(opts.rows)]))
        _, mask, _ = mae.random_masking(torch.zeros(opts.rows, opts.grid ** 2, 1), opts.mask_ratio, noise)
        cells = (1 - mask).view(opts.rows, 1, opts.grid, opts.grid)  # white = visible
        cells = F.pad(F.interpolate(cells, scale_factor=8), (2, 2, 2, 2), value=0.5)  # a grey frame between cells
        columns.append(cells.expand(-1, 3, -1, -1))
    common.save_picture(columns, opts.out)
    print(f'wrote {opts.out}: columns random, {", ".join(mae.COLORS)}')


if __name__ == '__main__':
    main()
