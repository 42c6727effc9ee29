"""A run's fingerprint: hashes of its merged config, of the checkpoint it starts from and of the
code that trains it (docs/sweeps.md, "What done means")."""

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


def _merged_config(config_file: str, overrides: Sequence[str]) -> Optional[object]:
    """The config as train_net.py merges it (a CfgNode or a LazyConfig's DictConfig), or None
    where it cannot be merged here (no detectron2, or a key it does not know: the run will fail)."""
    try:
        if is_lazy_config(config_file):
            from detectron2.config import LazyConfig

            return LazyConfig.apply_overrides(LazyConfig.load(config_file), list(overrides))
        from masklab_d2.config import load_config

        return load_config(config_file, overrides)
    except Exception:  # noqa: BLE001  (any failure to merge: the caller hashes what it can)
        return None


def _initial_weights(cfg: Optional[object], config_file: str, overrides: Sequence[str]) -> str:
    """The checkpoint a run starts from (``MODEL.WEIGHTS``, ``train.init_checkpoint``), "" for
    none. Without ``cfg`` (no detectron2, e.g. on a login node) the overrides, then the YAML files
    (leaf first), say it; a LazyConfig file that sets it can only be read with detectron2."""
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
    """The hash of the config a run trains with: the merged ``cfg`` (:func:`_merged_config`) as
    YACS dumps it or as a LazyConfig's Python; without it, the files' texts and the overrides."""
    if cfg is None:
        text = json.dumps([_config_texts(config_file), overrides])
    elif hasattr(cfg, "dump"):
        text = cfg.dump()
    else:
        from detectron2.config import LazyConfig

        text = LazyConfig.to_py(cfg)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def weights_digest(cfg: Optional[object], config_file: str, overrides: Sequence[str]) -> str:
    """12 hex digits of the checkpoint file a run starts from (:func:`_initial_weights`); "" when
    it starts from no file of this machine (no weights, a URL or a ``detectron2://`` name: the
    config hash covers that text); "unknown" when the file is not there (yet)."""
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


# Paths (relative to the repository) whose contents decide what a run computes, except the
# tools that launch, resume and report runs (they never run inside one).
TRAINING_CODE = ("masklab_d2", "csrc", "train_net.py", "setup.py")
TRAINING_CODE_EXCLUDED = "masklab_d2/tools/"


def _git(root: str, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=60
    ).stdout


@functools.lru_cache(maxsize=None)
def training_code_digest(root: str = str(REPO_ROOT)) -> str:
    """A hash of the training code's files (:data:`TRAINING_CODE`) as they are on disk, committed
    or not (the files git tracks or would track); "unknown" outside a git checkout."""
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
    for path in sorted(
        set(p for p in listing.split("\0") if p and not p.startswith(TRAINING_CODE_EXCLUDED))
    ):
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
    return f"{commit}+dirty.{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else commit


def run_fingerprint(run: Run) -> Dict[str, str]:
    """{"config", "weights", "code", "commit"} of a run: the hashes above, and the code version
    (for the reader; not compared). The output folder is left out (a sweep moved with
    --output-root runs the same thing); the seed is in."""
    config_file = run.cell.config_file
    # The device says where a run trains, not what; a CPU sweep host and a GPU node must agree.
    overrides = config_overrides(config_file, "", run.seed, run.cell.overrides, device="cpu")
    cfg = _merged_config(config_file, overrides)  # once, for both hashes
    return {
        "config": config_hash(config_file, overrides, cfg),
        "weights": weights_digest(cfg, config_file, overrides),
        "code": training_code_digest(),
        "commit": code_version(),
    }


def fingerprints_of(runs: List[Run]) -> Dict[str, Dict[str, str]]:
    """{run name: fingerprint} of each run."""
    return {run.name: run_fingerprint(run) for run in runs}
