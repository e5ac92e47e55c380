"""What a training run records: the loss per m range (the Matryoshka curve while training)
and the metrics log (W/metrics.jsonl and TensorBoard events)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tensorboardX import SummaryWriter

from mqt_jax.core.outputs import write_atomic


def m_ranges(num_queries: int) -> list[tuple[int, int]]:
    """(lo, hi] buckets at powers of 4 up to M: (0, 4], (4, 16], (16, 64], ..."""
    edges = [0]
    while edges[-1] < num_queries:
        edges.append(min(max(4 * edges[-1], 4), num_queries))
    return list(zip(edges[:-1], edges[1:]))


def loss_by_m(row_nll: np.ndarray, batch: dict, num_queries: int) -> dict[str, float]:
    """The Matryoshka curve during training: mean token loss per m range. A row counts under
    the m of its first image (exact without packing); rows without images are left out."""
    tokens = batch["loss_mask"].sum(1)
    has_image = (batch["visual_index"] >= 0).any(1)
    m = batch["m"][:, 0]
    out = {}
    for lo, hi in m_ranges(num_queries):
        sel = has_image & (m > lo) & (m <= hi) & (tokens > 0)
        if sel.any():
            out[f"loss_m/{lo + 1}-{hi}"] = float(row_nll[sel].sum() / tokens[sel].sum())
    return out


class MetricsLog:
    """Process 0's record of a run: W/metrics.jsonl (one JSON object per logged step) and
    TensorBoard events in W/tensorboard (every scalar, and the histogram of m)."""

    def __init__(self, workdir: Path, resume_step: int):
        """A resumed run keeps the rows up to its checkpoint's step (the later ones are
        trained again and logged anew)."""
        path = workdir / "metrics.jsonl"
        kept = []
        if resume_step and path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut off by a kill
        write_atomic(path, "".join(kept))
        self.file = path.open("a")
        # events after the checkpoint's step are dropped too (they are logged anew)
        self.board = SummaryWriter(str(workdir / "tensorboard"),
                                   purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict, batch: dict) -> None:
        step = row["step"]
        for key, value in row.items():
            if key != "step":
                self.board.add_scalar(key, value, step)
        used = batch["m"][(batch["visual_index"] >= 0).any(1)][:, 0]  # rows with an image
        if used.size:
            self.board.add_histogram("m", used, step)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self.board.close()
