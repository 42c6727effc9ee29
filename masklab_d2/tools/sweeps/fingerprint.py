"""A run's fingerprint: the hash of its merged config, of the checkpoint it starts from and of
the code that trains it.

The sweep records the fingerprint in each run's status file when it launches the run and
compares it with the current one on every rerun, so that a changed option, config file or code
never passes an old result off as the new one's. "The code" is what a run executes
(:data:`TRAINING_CODE`: the package without its tools, the C++/CUDA sources, train_net.py and
setup.py), hashed from its files' contents, committed or not; a commit that only
touches documentation, tests, projects/ or the tools that drive and report runs leaves every
finished run valid, so a sweep spread over several sittings survives the work done between them.
The checkpoint a run starts from (``MODEL.WEIGHTS``, e.g. the shared frozen detector of the
head-only suites) is hashed from its contents: a retrained detector at the same path makes the
runs trained on the old one stale, so a table never mixes heads trained on different detectors.
The commit itself is recorded too, for the reader.
"""

import functools
import hashlib
import json
import os
import subprocess
from typing import Dict, List, Optional, Sequence

import yaml

from masklab_d2.tools.sweeps.commands import config_overrides
from masklab_d2.tools.sweeps.spec import REPO_ROOT, Run
from masklab_d2.utils.config_files import is_lazy_config


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _merged_config(config_file: str, overrides: Sequence[str]) -> Optional[object]:
    """The config as train_net.py merges it (a YACS CfgNode, or a LazyConfig's DictConfig), or
    None where it cannot be merged here (no detectron2, a key it does not know, which the run
    will fail on)."""
    try:
        if is_lazy_config(config_file):
            from detectron2.config import LazyConfig

            return LazyConfig.apply_overrides(LazyConfig.load(config_file), list(overrides))
        from masklab_d2.config import load_config

        return load_config(config_file, overrides)
    except Exception:  # noqa: BLE001  (any failure to merge: the caller hashes what it can)
        return None


def _config_text(cfg: object) -> str:
    """A merged config as text: YACS's dump, or a LazyConfig as Python (objects by name)."""
    if hasattr(cfg, "dump"):
        return cfg.dump()
    from detectron2.config import LazyConfig

    return LazyConfig.to_py(cfg)


def _initial_weights(cfg: Optional[object], config_file: str, overrides: Sequence[str]) -> str:
    """The checkpoint a run starts from: ``MODEL.WEIGHTS``, a LazyConfig's
    ``train.init_checkpoint``; "" for none.

    Args:
        cfg: the merged config; None where it could not be merged here (no detectron2, e.g. on a
            login node): the overrides, then the YAML files (leaf first), say it instead; a
            LazyConfig file that sets it can only be read with detectron2.
    """
    if hasattr(cfg, "MODEL"):
        return cfg.MODEL.WEIGHTS
    if cfg is not None:
        return cfg.get("train", {}).get("init_checkpoint") or ""
    if is_lazy_config(config_file):
        values = [o.split("=", 1)[1] for o in overrides if o.startswith("train.init_checkpoint=")]
        return values[-1].strip("'\"") if values else ""
    values = [v for k, v in zip(overrides[::2], overrides[1::2]) if k == "MODEL.WEIGHTS"]
    if values:
        return values[-1]
    for text in _config_texts(config_file):
        try:
            model = (yaml.safe_load(text) or {}).get("MODEL") or {}
        except (yaml.YAMLError, AttributeError):
            continue
        if isinstance(model, dict) and "WEIGHTS" in model:
            return model["WEIGHTS"] or ""
    return ""


def config_hash(config_file: str, overrides: Sequence[str], cfg: Optional[object]) -> str:
    """The hash of the config a run trains with: detectron2's defaults, masklab_d2's keys, the
    file (with its _BASE_ files) and the overrides, merged as train_net.py merges them.

    Args:
        cfg: that merged config (:func:`_merged_config`); None where it could not be merged here,
            and the hash covers the files' texts and the overrides instead.
    """
    text = (
        _config_text(cfg)
        if cfg is not None
        else json.dumps([_config_texts(config_file), overrides])
    )
    return _sha1(text)[:12]


def initial_weights_digest(
    cfg: Optional[object], config_file: str, overrides: Sequence[str]
) -> str:
    """A hash of the contents of the checkpoint file a run starts from (``MODEL.WEIGHTS``).

    Args:
        cfg: the run's merged config (:func:`_merged_config`), None where it could not be merged.
        config_file, overrides: the run's config file and overrides, read where ``cfg`` is None.

    Returns:
        12 hex digits; "" when the run starts from no file of this machine (no weights, a URL or
        a ``detectron2://`` name: the config hash covers that text); "unknown" when the file is
        not there (yet).
    """
    weights = _initial_weights(cfg, config_file, overrides)
    if not weights or "://" in weights:
        return ""
    path = os.path.abspath(os.path.expanduser(weights))  # as the run resolves it: from the cwd
    try:
        stat = os.stat(path)
    except OSError:
        return "unknown"
    return _file_digest(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha1 of a file, once per (path, size, modification time): a sweep's runs share one."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()[:12]


def _config_texts(config_file: str, depth: int = 0) -> List[str]:
    """The text of a YAML config and of the _BASE_ files it inherits from (of a LazyConfig: its
    own text)."""
    try:
        with open(config_file) as f:
            text = f.read()
        if is_lazy_config(config_file):
            return [text]
        base = (yaml.safe_load(text) or {}).get("_BASE_") if depth < 10 else None
    except (OSError, yaml.YAMLError, AttributeError):
        return [f"unreadable: {config_file}"]
    texts = [text]
    if isinstance(base, str):
        if not base.startswith(("/", "~")) and "://" not in base:
            base = os.path.join(os.path.dirname(config_file), base)
        texts += _config_texts(os.path.expanduser(base), depth + 1)
    return texts


# Paths (relative to the repository) whose contents decide what a run computes; the exclusions
# are the tools that launch, resume and report runs (they never run inside one).
TRAINING_CODE = ("masklab_d2", "csrc", "train_net.py", "setup.py")
TRAINING_CODE_EXCLUDED = ("masklab_d2/tools",)


def _git(root: str, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=60
    ).stdout


@functools.lru_cache(maxsize=None)
def training_code_digest(root: str = str(REPO_ROOT)) -> str:
    """A hash of the training code's files (:data:`TRAINING_CODE`) as they are on disk: the
    files git tracks or would track (ignored ones, e.g. build outputs, left out), committed or
    not, so the same code gives the same digest whether or not it was committed; "unknown"
    outside a git checkout."""
    excluded = tuple(path + "/" for path in TRAINING_CODE_EXCLUDED)
    try:
        listing = _git(
            root,
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
            "--",
            *TRAINING_CODE,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    digest = hashlib.sha1()
    for path in sorted(set(p for p in listing.split("\0") if p and not p.startswith(excluded))):
        try:
            with open(os.path.join(root, path), "rb") as f:
                content = f.read()
        except OSError:  # tracked but deleted: absent from the code that runs
            continue
        digest.update(path.encode() + b"\0" + hashlib.sha1(content).digest())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def code_version(root: str = str(REPO_ROOT)) -> str:
    """The git commit of the code, with "+dirty.<hash of the diff>" when tracked files differ
    from it; "unknown" outside a git checkout."""

    try:
        commit = _git(root, "rev-parse", "HEAD").strip()
        diff = _git(root, "diff", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty.{_sha1(diff)[:8]}" if diff else commit


def run_fingerprint(run: Run) -> Dict[str, str]:
    """{"config": hash of the merged config, "weights": digest of the checkpoint it starts from,
    "code": training-code digest, "commit": code version (for the reader; not compared)} of a
    run.

    The output folder is left out (a sweep moved with --output-root runs the same thing); the
    seed is in.
    """
    # The device says where a run trains, not what; a CPU sweep host and a GPU node must agree.
    overrides = config_overrides(
        run.cell.config_file, "", run.seed, run.cell.overrides, device="cpu"
    )
    cfg = _merged_config(run.cell.config_file, overrides)  # once, for both hashes
    return {
        "config": config_hash(run.cell.config_file, overrides, cfg),
        "weights": initial_weights_digest(cfg, run.cell.config_file, overrides),
        "code": training_code_digest(),
        "commit": code_version(),
    }


def fingerprints_of(runs: List[Run]) -> Dict[str, Dict[str, str]]:
    """{run name: fingerprint} of each run."""
    return {run.name: run_fingerprint(run) for run in runs}
