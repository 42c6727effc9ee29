"""Checkpoints that survive a crash: MaskLabCheckpointer writes checkpoints and last_checkpoint
atomically, and on resume reports a checkpoint that cannot be read by name and uses the newest
readable one instead; train_net.py --resume does so for a YAML config and its LazyConfig twin."""

import logging
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from helpers import REPO, TINY_LAZY_OPTS, TINY_YAML_OPTS, run_python  # noqa: E402
from torch import nn  # noqa: E402

ITERATIONS = (1, 3, 5)


class _Records(logging.Handler):
    """The warnings a logger emits, as text."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.messages)


@pytest.fixture
def warnings_logged():
    """Warnings of the checkpointer's logger (fvcore's, which detectron2's setup_logger may have
    detached from the root logger that caplog watches)."""
    logger = logging.getLogger("fvcore.common.checkpoint")
    records = _Records()
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(records)
    logger.setLevel(level)


def _checkpointer(folder, value: float = 0.0):
    """A MaskLabCheckpointer of a small model whose weights all equal ``value``, with an
    optimizer as a checkpointable (as the trainers have)."""
    from masklab_d2.modeling import MaskLabCheckpointer

    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)
    optimizer = torch.optim.SGD(model.parameters(), lr=value + 1.0)
    return MaskLabCheckpointer(model, str(folder), optimizer=optimizer)


def _save_run(folder, iterations=ITERATIONS, final=None):
    """Checkpoints as a run saves them (model_XXXXXXX.pth, weights = iteration), then
    model_final.pth at iteration ``final`` if given; last_checkpoint names the last."""
    for iteration in iterations:
        _checkpointer(folder, iteration).save(f"model_{iteration:07d}", iteration=iteration)
    if final is not None:
        _checkpointer(folder, final).save("model_final", iteration=final)


def _resume(folder):
    """(iteration, weight value) that resume_or_load(resume=True) restores."""
    checkpointer = _checkpointer(folder, value=-1.0)
    extra = checkpointer.resume_or_load("", resume=True)
    return extra.get("iteration"), checkpointer.model[0].weight[0, 0].item()


def _truncate(path):
    """Cuts a file to half its size, as a kill during an in-place write leaves it."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _listing(folder):
    return {name: os.path.getsize(folder / name) for name in os.listdir(folder)}


@pytest.mark.parametrize(
    "cut, final, expected",
    [
        (["model_0000005.pth"], None, 3),
        (["model_0000005.pth", "model_0000003.pth"], None, 1),
        (["model_final.pth"], 7, 5),
    ],
    ids=["newest", "two-newest", "final"],
)
def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one(
    tmp_path, warnings_logged, cut, final, expected
):
    _save_run(tmp_path, final=final)
    for name in cut:
        _truncate(tmp_path / name)
    before = _listing(tmp_path)

    assert _resume(tmp_path) == (expected, expected)
    warned = warnings_logged.text()
    for name in cut:  # each reported by name, with torch's error
        assert re.search(rf"{name}.* cannot be read: \w+", warned), warned
    chosen = f"model_{expected:07d}.pth"
    assert f"Resuming from {tmp_path / chosen} (iteration {expected}) instead" in warned, warned
    if final is None:
        assert f"{5 - expected} iterations lost" in warned, warned
    assert _listing(tmp_path) == before  # nothing deleted, nothing rewritten


def test_damage_inside_a_checkpoint_of_the_right_size_is_detected(tmp_path, warnings_logged):
    """torch's reader does not check the CRC-32s: a flipped block of weights would load."""
    _save_run(tmp_path)
    path = tmp_path / "model_0000005.pth"
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)  # a weight tensor
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)  # the local header's name and extra field lengths
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(record.header_offset + 30 + name_length + extra_length + record.file_size // 2)
        f.write(b"\xff" * 16)

    assert _resume(tmp_path) == (3, 3)
    assert "model_0000005.pth" in warnings_logged.text() and "CRC" in warnings_logged.text()


def test_an_empty_last_checkpoint_resumes_from_the_newest_checkpoint(tmp_path, warnings_logged):
    _save_run(tmp_path)
    (tmp_path / "last_checkpoint").write_text("")

    assert _resume(tmp_path) == (5, 5)
    warned = warnings_logged.text()
    assert f"{tmp_path / 'last_checkpoint'} is empty" in warned, warned
    assert f"Resuming from {tmp_path / 'model_0000005.pth'} (iteration 5)" in warned, warned


def test_a_last_checkpoint_naming_a_missing_file_resumes_from_the_newest_checkpoint(
    tmp_path, warnings_logged
):
    _save_run(tmp_path)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")

    assert _resume(tmp_path) == (5, 5)
    warned = warnings_logged.text()
    assert f"{tmp_path / 'model_0000009.pth'}, which" in warned, warned
    assert "does not exist" in warned and "4 iterations lost" in warned, warned


def test_no_readable_checkpoint_is_a_clear_error_and_deletes_nothing(tmp_path):
    _save_run(tmp_path, iterations=(1, 3))
    for name in ("model_0000001.pth", "model_0000003.pth"):
        _truncate(tmp_path / name)
    before = _listing(tmp_path)

    with pytest.raises(
        RuntimeError, match="Cannot resume: no checkpoint in .* can be read"
    ) as error:
        _resume(tmp_path)
    assert "model_0000001.pth" in str(error.value) and "model_0000003.pth" in str(error.value)
    assert "without --resume" in str(error.value)
    assert _listing(tmp_path) == before


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path):
    """A save that raises (here: a state that cannot be pickled) leaves the old file and
    last_checkpoint as they were, and no temporary file."""
    _save_run(tmp_path, iterations=(), final=1)
    before = (tmp_path / "model_final.pth").read_bytes()
    checkpointer = _checkpointer(tmp_path, 2.0)
    with pytest.raises(Exception):
        checkpointer.save("model_final", iteration=2, unpicklable=lambda: None)

    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]
    assert _resume(tmp_path) == (1, 1)


def test_saves_keep_detectron2s_names_modes_and_periodic_deletion(tmp_path):
    """What the atomic save must not change: file names, the tag, the mode a plain open gives,
    and PeriodicCheckpointer's max_to_keep (it reads the tag after every save)."""
    from fvcore.common.checkpoint import PeriodicCheckpointer

    checkpointer = _checkpointer(tmp_path, 1.0)
    periodic = PeriodicCheckpointer(checkpointer, period=2, max_iter=8, max_to_keep=2)
    for iteration in range(8):
        periodic.step(iteration)
    names = sorted(os.listdir(tmp_path))
    assert names == ["last_checkpoint", "model_0000005.pth", "model_0000007.pth", "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(tmp_path / "model_final.pth").st_mode & 0o777 == 0o666 & ~umask


# Saves model_final.pth three times, then a fourth time through a file that stops halfway (its
# first half flushed to the file system) and says so in a marker file; the test then SIGKILLs it.
_KILLED_DURING_SAVE = textwrap.dedent("""
    import os, sys, time
    import torch
    from torch import nn
    from masklab_d2.modeling import MaskLabCheckpointer

    folder, marker = sys.argv[1:]
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])  # about 8 MB
    checkpointer = MaskLabCheckpointer(model, folder)

    def save(value):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(value)
        checkpointer.save("model_final", iteration=value)

    for value in (1, 2, 3):
        save(value)
    half = os.path.getsize(os.path.join(folder, "model_final.pth")) // 2

    class StopsHalfway:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) >= half:
                self.f.write(data[: half - self.written])
                self.f.flush()
                with open(marker, "w") as m:
                    m.write("halfway")
                time.sleep(600)
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    torch_save = torch.save
    torch.save = lambda obj, f, *args, **kwargs: torch_save(obj, StopsHalfway(f), *args, **kwargs)
    save(4)
    """)


def test_a_sigkill_during_a_save_leaves_the_previous_checkpoint_to_resume(tmp_path):
    folder, marker = tmp_path / "run", tmp_path / "halfway"
    folder.mkdir()
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _KILLED_DURING_SAVE, str(folder), str(marker)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        try:
            deadline = time.time() + 300
            while not marker.exists() and process.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            assert marker.exists(), (tmp_path / "log").read_text()[-3000:]
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait(timeout=60)

    assert process.returncode == -signal.SIGKILL
    assert (folder / "last_checkpoint").read_text() == "model_final.pth"
    from masklab_d2.modeling import MaskLabCheckpointer

    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])
    extra = MaskLabCheckpointer(model, str(folder)).resume_or_load("", resume=True)
    assert extra["iteration"] == 3
    assert all(torch.all(p == 3) for p in model.parameters())


# --- train_net.py --resume end to end, YAML and LazyConfig -------------------------------------
# Five iterations saving every second (model_0000001, model_0000003, model_final at iteration
# 4), model_final cut short; the resumed run must start after model_0000003's iteration 3.

_YAML = [
    "--config-file",
    os.path.join(REPO, "configs", "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.yaml"),
    *TINY_YAML_OPTS,
    *"SOLVER.WARMUP_ITERS 2 SOLVER.CHECKPOINT_PERIOD 2 TEST.EVAL_PERIOD 0".split(),
    *"TEST.DETECTIONS_PER_IMAGE 5 TEST.PRECISE_BN.NUM_ITER 2".split(),
]
_LAZY = [
    "--config-file",
    os.path.join(REPO, "configs", "lazy", "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.py"),
    *TINY_LAZY_OPTS,
    "train.checkpointer.period=2",
    "train.eval_period=1000",
    "train.precise_bn.num_iter=2",
]


def _yaml_args(output, max_iter):
    return _YAML + ["SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", str(output)]


def _lazy_args(output, max_iter):
    return _LAZY + [f"train.max_iter={max_iter}", f"train.output_dir={output}"]


@pytest.mark.parametrize("args_of", [_yaml_args, _lazy_args], ids=["yaml", "lazy"])
def test_train_net_resumes_past_a_truncated_newest_checkpoint(tmp_path, args_of):
    train_net = os.path.join(REPO, "train_net.py")
    first = run_python(train_net, *args_of(tmp_path, 5))
    assert first.returncode == 0, first.stdout[-3000:]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert (tmp_path / "model_0000003.pth").exists()
    _truncate(tmp_path / "model_final.pth")

    resumed = run_python(train_net, "--resume", *args_of(tmp_path, 6))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    log = resumed.stdout
    assert re.search(r"model_final\.pth, which .*last_checkpoint names, cannot be read", log), log
    assert f"Resuming from {tmp_path / 'model_0000003.pth'} (iteration 3) instead" in log, log
    assert "Starting training from iteration 4" in log, log
