"""``--tensorboard``: the run's metrics, sample grids and config as TensorBoard event files in
OUT/tensorboard/ (the optional extra ``aigc_fast[tensorboard]``).

It mirrors metrics.jsonl: every row appended there is written here too, each number as a scalar
(nested ones, e.g. SWD's levels, as ``swd/32``). A resumed run reopens the same folder with
``purge_step`` one past its checkpoint's step, so TensorBoard drops the events the checkpoint did
not keep, as metrics.jsonl drops their rows, and no step appears twice.
"""
import json
import numbers

from .extras import import_extra

BOARD_DIR = "tensorboard"


def _scalars(row, prefix=""):
    """(tag, value) of every number in a metrics row except its step, nested dicts flattened."""
    for key, value in row.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and key != "step":
            yield prefix + key, value


class Board:
    """A SummaryWriter on OUT/tensorboard that continues a resumed run at ``step``."""

    def __init__(self, out, step, config):
        import_extra("tensorboard", "--tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / BOARD_DIR), purge_step=step + 1 if step else None)
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```", step)

    def add_row(self, row):
        for tag, value in _scalars(row):
            self.writer.add_scalar(tag, value, row["step"])
        self.writer.flush()

    def add_grid(self, tag, pixels, step):
        """A uint8 (H, W, C) image grid."""
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self):
        self.writer.close()
