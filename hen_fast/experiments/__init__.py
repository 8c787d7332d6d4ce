"""The HEN paper's experiments as ``hen-fast`` subcommands, each writing JSON + PNG to ``--out``.

- ``hen-table1``: recall error vs bank size for raw pixels, the shipped encoders and the KMN
  baseline, with and without occlusion-aware recall (Table 1).
- ``hen-beta-sweep``: recall error against beta (Appendix B).
- ``hen-separability``: self/cross cosine-similarity histograms of cues and memories (Fig. 3).
- ``hen-rank``: relative rank of the recovered states over the updates (Appendix C).
- ``hen-hetero``: recall by caption (Table 5) and the shared-caption failure (Fig. 6).
- ``hen-scaling``: recall and meta-stable states vs bank size up to 5000 (15022) images (Table 1,
  Fig. 2).

Only argument parsing is imported here, so ``hen-fast --help`` stays fast.
"""

from __future__ import annotations


def add_commands(commands) -> None:
    from . import hetero, scaling, sweeps, table

    table.add_commands(commands)
    sweeps.add_commands(commands)
    hetero.add_commands(commands)
    scaling.add_commands(commands)
