"""--tensorboard: event files read back with TensorBoard's own reader, across a resume."""
import json
import shutil

import pytest

from aigc_fast.train import main
from cli_helpers import run_cli
from extras_helpers import require_extra

TINY = ["--ngf", "8", "--ndf", "8", "--nz", "16", "--batch-size", "4", "--log-every", "1",
        "--eval-every", "2", "--eval-n", "16", "--checkpoint-every", "2", "--sample-every", "2"]


@pytest.mark.extras
def test_event_files_mirror_metrics_and_a_resume_duplicates_no_step(tmp_path, capsys,
                                                                     shapes_npz):
    """A run of 3 steps dies after logging step 3 but before its checkpoint (last.pt is put back
    to step 2's); the resumed run logs step 3 again and then 4. The reader must see each step
    once, with the values metrics.jsonl keeps (the resumed run's)."""
    event_accumulator = require_extra("tensorboard.backend.event_processing.event_accumulator")
    out, data = tmp_path / "run", shapes_npz(16, 0)
    argv = ["--data", data, "--tensorboard", "--out", str(out)] + TINY
    assert run_cli(main, argv + ["--steps", "3"], capsys, "aigc_fast.train")[0] == 0
    shutil.copy(out / "checkpoints" / "step_000002.pt", out / "checkpoints" / "last.pt")
    status, _, err = run_cli(main, ["--resume", str(out / "checkpoints" / "last.pt"), "--steps",
                                    "4"], capsys, "aigc_fast.train")
    assert status == 0, err
    board = event_accumulator.EventAccumulator(str(out / "tensorboard"),
                                               size_guidance={event_accumulator.SCALARS: 0,
                                                              event_accumulator.IMAGES: 0})
    board.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s"):
        events = board.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3, 4], key
        expected = [r[key] for r in rows if key in r]
        assert [e.value for e in events] == pytest.approx(expected, rel=1e-6), key
    assert [e.step for e in board.Scalars("swd/mean")] == [0, 2, 4]
    assert [e.value for e in board.Scalars("swd/mean")] == pytest.approx(
        [r["swd"]["mean"] for r in rows if "swd" in r], rel=1e-6)
    grids = board.Images("samples")
    assert [g.step for g in grids] == [2, 4] and grids[0].width == grids[0].height > 32
    config = board.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"dataset": "npz"' in config and '"tensorboard": true' in config
