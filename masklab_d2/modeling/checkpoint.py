"""MaskLabCheckpointer: detectron2's DetectionCheckpointer that can initialise one checkpoint
block into several places of the model, and whose checkpoints survive a crash during a save.

MaskLab's C4 model has two res5 stages: the backbone's (under the semantic / direction branch)
and a duplicate that classifies boxes (:class:`~masklab_d2.modeling.box_heads.Res5BoxHead`). The
paper initialises both from ImageNet (its Table 6, "BC"). detectron2's name-matching heuristics
for Caffe2 / pycls checkpoints match the checkpoint's ``res5.*`` keys to both
``backbone.res5.*`` and ``roi_heads.box_head.res5.*`` and stop with "Cannot match one
checkpoint key to multiple keys". Renaming the duplicate would only make it start from random
weights silently.

Here a module says where its weights come from in a pretrained checkpoint by a class attribute
``pretrained_sources``: ``{child name: checkpoint prefix}``. Before the heuristics run, every
checkpoint key under that prefix is copied to the module's full name (``roi_heads.box_head.res5.*``
for ``res5.*``); the heuristics then match the longer, exact name for the duplicate and the short
one for the backbone, and both copies start from the checkpoint. Checkpoints that already hold
the model's own names (anything detectron2 or this project wrote) are loaded unchanged.

It also makes checkpoints survive a crash. fvcore's ``Checkpointer.save`` writes the checkpoint
and then ``last_checkpoint`` in place, so a kill during a save (a node failure, the OOM killer)
while an existing file is rewritten (``model_final.pth``, a checkpoint saved again after a
resume) leaves ``last_checkpoint`` naming a cut-short file, and ``--resume`` then stops with
torch's zip-reader error. Here:

* both files are written to a temporary file in the same folder (``.<name>.<random>.partial``),
  flushed and fsync'ed, then renamed over the old one (``os.replace``, atomic), and the folder
  is fsync'ed, so either the old or the new file is there, whole, whenever the process dies;
* on resume (``resume_or_load(..., resume=True)``, ``get_checkpoint_file``), a checkpoint that
  cannot be read (cut short, damaged inside, empty, missing, or an empty ``last_checkpoint``)
  is reported by name, and the newest readable ``model_XXXXXXX.pth`` / ``model_final.pth`` of
  the folder is used instead (ordered by the iteration each stores), with a warning that says
  which and how many iterations are lost. Nothing is deleted. When no checkpoint can be read,
  it raises (see ``_newest_readable`` for why that, rather than a fresh start).

Folders given as URLs (an object store through detectron2's PathManager) keep fvcore's
behaviour: there is no rename to build on there.
"""

import contextlib
import numbers
import os
import re
import tempfile
import zipfile
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names
from torch import nn

__all__ = ["MaskLabCheckpointer", "add_pretrained_aliases", "write_atomically"]

# What detectron2's hooks save: PeriodicCheckpointer's model_{iteration:07d} and model_final,
# GracefulStopHook's model_{iteration:07d}. Other names (model_best, ...) are not points of a
# run's history, so they are never resumed from in place of the one last_checkpoint names.
_CHECKPOINT_NAME = re.compile(r"^model_(\d+|final)\.pth$")
# write_atomically's temporary files: hidden, and not *.pth, so that nothing takes them for
# checkpoints (fvcore's get_all_checkpoint_files, the sweeps' globs).
_PARTIAL_SUFFIX = ".partial"
_PARTIAL_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+\.partial$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def add_pretrained_aliases(model: nn.Module, checkpoint_state: Dict[str, object]) -> List[str]:
    """Copies pretrained-checkpoint keys to the modules that declare them as their source.

    Args:
        model: the model being loaded (unwrapped).
        checkpoint_state: checkpoint keys (detectron2 names, after any Caffe2 renaming) to
            values; updated in place.

    Returns:
        "target <- prefix" for each declared source that received keys.
    """
    aliased = []
    for module_name, module in model.named_modules():
        for child, prefix in getattr(module, "pretrained_sources", {}).items():
            target = f"{module_name}.{child}" if module_name else child
            added = 0
            for key in [k for k in checkpoint_state if k.startswith(prefix + ".")]:
                alias = target + key[len(prefix) :]
                if alias not in checkpoint_state:
                    checkpoint_state[alias] = checkpoint_state[key]
                    added += 1
            if added:
                aliased.append(f"{target} <- {prefix}")
    return aliased


def _is_local(path: str) -> bool:
    """Whether ``path`` is a file system path (not a URL that a PathManager handler serves)."""
    return not _URL.match(path)


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: str) -> None:
    """Makes a rename in ``directory`` durable; skipped where a folder cannot be opened or
    synced (Windows, some network file systems): the rename is still atomic there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Replaces the local file ``path`` with what ``write`` writes, all at once: a kill at any
    moment leaves either the old file or the new one, whole.

    ``write`` gets a binary file in the same folder (``.<name>.<random>.partial``), which is then
    flushed, fsync'ed and renamed over ``path`` (``os.replace``); the folder is fsync'ed after
    it. On an exception the temporary file is removed; a kill leaves it behind, hidden.

    Args:
        path: the file to write.
        write: called once with the open file.
    """
    directory = os.path.dirname(path) or "."
    try:
        mode = os.stat(path).st_mode & 0o7777  # as opening the file for writing keeps it
    except OSError:
        mode = 0o666 & ~_umask()  # as a new file opened for writing gets
    fd, partial = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=_PARTIAL_SUFFIX, dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)  # mkstemp makes it 0o600
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    _fsync_directory(directory)


def _stat_key(path: str) -> Optional[Tuple[int, int]]:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _iteration_of(checkpoint: Any) -> Optional[int]:
    """The iteration a checkpoint stores: ``iteration=`` of detectron2's hooks, else the
    trainer's state's."""
    if not isinstance(checkpoint, dict):
        return None
    for value in (checkpoint.get("iteration"), (checkpoint.get("trainer") or {}).get("iteration")):
        if isinstance(value, numbers.Integral):
            return int(value)
    return None


def _newness(name: str, iteration: Optional[int]) -> Tuple[float, float]:
    """Sort key of a checkpoint file, newest largest: the iteration it stores, else the one
    its name says; model_final after a numbered file of the same iteration."""
    number = _CHECKPOINT_NAME.match(name).group(1)
    by_name = float("inf") if number == "final" else float(number)
    return (by_name if iteration is None else iteration), by_name


def _lost(named: str, iteration: Optional[int]) -> str:
    """How many iterations resuming from ``iteration`` loses against ``named``, the file
    ``last_checkpoint`` names ("" if it names none)."""
    if iteration is None:
        return "the checkpoint stores no iteration, so how many are lost is not known"
    resumed = f"training continues from iteration {iteration + 1}"
    match = re.match(r"^model_(\d+)\.pth$", named)
    if match:
        saved = int(match.group(1))
        lost = max(saved - iteration, 0)
        return f"{lost} iterations lost ({named} was saved after iteration {saved}; {resumed})"
    if named == "model_final.pth":
        return f"{resumed}: the iterations from there to the end of the run that saved it are lost"
    if named:
        return f"{resumed}; how many iterations {named} held beyond it is not known"
    return f"{resumed}; how many iterations are lost is not known (last_checkpoint names no file)"


def _check_archive(path: str) -> None:
    """Reads every record of a zip-format checkpoint through, checking its CRC-32, and raises
    ``zipfile.BadZipFile`` at the first that does not match.

    A cut-short file fails earlier (no zip directory at its end); this catches damage inside a
    file of the right size, which torch's reader, which skips the CRC check, would load as
    wrong weights.
    """
    if not zipfile.is_zipfile(path):
        return  # an old-format (pickle) file: reading it whole already checked it
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC == 0 and info.file_size:
                continue  # written without CRC-32s (torch.serialization.set_crc32_options)
            with archive.open(info) as record:
                while record.read(1 << 24):
                    pass


class MaskLabCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that honours modules' ``pretrained_sources`` and survives a crash
    during a save (module docstring)."""

    def __init__(self, model, save_dir="", *, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        # Checkpoints known to be whole: written by this object, or read through once. Path ->
        # (size, modification time in ns, iteration stored); a file that changes is read again.
        # PeriodicCheckpointer(max_to_keep=...) asks for the last checkpoint after every save.
        self._whole: Dict[str, Tuple[int, int, Optional[int]]] = {}

    # ----------------------------------------------------------------------------- saving

    def save(self, name: str, **kwargs: Any) -> None:
        """As fvcore's ``Checkpointer.save`` (same file name, tag, only where ``save_to_disk``),
        but the file and then ``last_checkpoint`` are each replaced atomically.

        Args:
            name: the file name without ``.pth``.
            kwargs: extra data to save (``iteration=``, as detectron2's hooks pass it).
        """
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):
            # Object stores have no rename to build on; their uploads are whole or absent.
            super().save(name, **kwargs)
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        self.logger.info(f"Saving checkpoint to {save_file}")
        # torch.save looked up at call time, as fvcore does, so that a wrapper of it sees this
        # save too.
        write_atomically(save_file, lambda f: torch.save(data, f))
        self._remember(save_file, _iteration_of(data))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Names the last checkpoint in ``last_checkpoint``, replacing that file atomically.

        Args:
            last_filename_basename: the checkpoint's file name in the save folder.
        """
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        if not _is_local(save_file):
            super().tag_last_checkpoint(last_filename_basename)
            return
        write_atomically(save_file, lambda f: f.write(last_filename_basename.encode("utf-8")))

    # ---------------------------------------------------------------------------- resuming

    def get_checkpoint_file(self) -> str:
        """The checkpoint to resume from: the one ``last_checkpoint`` names if it can be read,
        else the newest readable checkpoint of the folder (with warnings; module docstring).

        Returns:
            The file's path; "" when there is no ``last_checkpoint`` (as fvcore).

        Raises:
            RuntimeError: ``last_checkpoint`` exists but no checkpoint of the folder can be read.
        """
        if not _is_local(self.save_dir):
            return super().get_checkpoint_file()
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with open(tag, encoding="utf-8") as f:
                named = f.read().strip()
        except OSError:
            return ""  # as fvcore: no tag, or it was removed meanwhile
        path = os.path.join(self.save_dir, named) if named else ""
        if path and path in self._whole and self._whole[path][:2] == _stat_key(path):
            return path
        self._report_leftovers()
        problem = self._read_problem(path) if path else f"{tag} is empty"
        if problem is None:
            return path
        if path:
            problem = f"{path}, which {tag} names, cannot be read: {problem}"
        self.logger.warning(problem)
        return self._newest_readable(path, named, problem)

    def _newest_readable(self, unreadable: str, named: str, problem: str) -> str:
        """The newest checkpoint of the save folder that can be read, other than
        ``unreadable`` (ordered by the iteration they store, else their name)."""
        readable = []
        problems = [problem]
        for name in sorted(os.listdir(self.save_dir)):
            path = os.path.join(self.save_dir, name)
            if path == unreadable or not _CHECKPOINT_NAME.match(name) or not os.path.isfile(path):
                continue
            try:
                iteration = self._stored_iteration(path)
            except Exception as e:  # noqa: BLE001 (any reason it cannot be read: reported)
                problems.append(self._report_unreadable(path, e))
                continue
            readable.append((_newness(name, iteration), path, iteration))
        for _, path, iteration in sorted(readable, reverse=True):
            try:
                _check_archive(path)
            except Exception as e:  # noqa: BLE001
                problems.append(self._report_unreadable(path, e))
                continue
            self._remember(path, iteration)
            self.logger.warning(
                f"Resuming from {path} (iteration {iteration}) instead: {_lost(named, iteration)}"
            )
            return path
        # An error, not a fresh start from the initial weights: with --resume a detectron2 user
        # expects the run to continue, and a fresh run would go on to overwrite these files
        # (same names) with its own checkpoints. When every checkpoint fails to load, the cause
        # is more often the setup (a torch or a config that cannot read them) than damage to
        # all of them. Whoever does want to start over says so by moving the files away or by
        # running without --resume.
        raise RuntimeError(
            f"Cannot resume: no checkpoint in {self.save_dir} can be read (nothing was deleted): "
            + "; ".join(problems)
            + ". To start over instead, move last_checkpoint and the checkpoints out of the "
            "folder, or run without --resume."
        )

    def _read_problem(self, path: str) -> Optional[str]:
        """None if ``path`` is a whole, readable checkpoint, else why not."""
        if not os.path.isfile(path):
            return "it does not exist"
        try:
            iteration = self._stored_iteration(path)
            _check_archive(path)
        except Exception as e:  # noqa: BLE001 (any reason it cannot be read: reported)
            return f"{type(e).__name__}: {e}"
        self._remember(path, iteration)
        return None

    def _stored_iteration(self, path: str) -> Optional[int]:
        """Reads the checkpoint's structure (its tensors mapped, not read) and returns the
        iteration it stores; raises what reading it raises."""
        # torch.load's defaults, as fvcore's _load_file (weights_only included), so that a file
        # the real load would reject is not chosen; mapped, so cheap for every candidate.
        mmap = zipfile.is_zipfile(path)  # else an old-format file (or a damaged one): read it
        checkpoint = torch.load(path, map_location=torch.device("cpu"), mmap=mmap)
        return _iteration_of(checkpoint)

    def _remember(self, path: str, iteration: Optional[int]) -> None:
        key = _stat_key(path)
        if key is not None:
            self._whole[path] = (*key, iteration)

    def _report_unreadable(self, path: str, error: Exception) -> str:
        message = f"{path} cannot be read: {type(error).__name__}: {error}"
        self.logger.warning(message)
        return message

    def _report_leftovers(self) -> None:
        """Points at what saves cut short left behind (nothing is deleted here)."""
        leftovers = [n for n in os.listdir(self.save_dir) if _PARTIAL_NAME.match(n)]
        if leftovers:
            self.logger.warning(
                f"{self.save_dir} holds files that saves cut short left behind (a kill during "
                f"a save; the checkpoints are unaffected; they may be deleted): "
                + ", ".join(sorted(leftovers))
            )

    # ----------------------------------------------------------------------------- loading

    def _torch_load(self, f):
        try:
            return super()._torch_load(f)
        except Exception as e:
            # torch's errors (a zip reader's, EOFError) do not say which file they are about.
            if hasattr(e, "add_note"):
                e.add_note(f"while reading the checkpoint {f}")
            self.logger.error(f"Cannot read the checkpoint {f}: {type(e).__name__}: {e}")
            raise

    def _load_model(self, checkpoint):
        if checkpoint.get("matching_heuristics", False):
            state = checkpoint["model"]
            self._convert_ndarray_to_tensor(state)
            if checkpoint.get("__author__") == "Caffe2":
                # Rename first (detectron2 would do it inside its matching), so the aliases
                # are added under detectron2's names.
                state, _ = convert_c2_detectron_names(state)
                checkpoint["__author__"] = "Caffe2 (renamed by masklab_d2)"
            aliased = add_pretrained_aliases(self.model, state)
            if aliased:
                self.logger.info(
                    "Initialising duplicated blocks from the checkpoint: " + ", ".join(aliased)
                )
            checkpoint["model"] = state
        return super()._load_model(checkpoint)
