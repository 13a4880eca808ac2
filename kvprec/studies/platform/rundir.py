"""The run directory every ``kvprec study <name>`` writes (docs/design.md, "Studies").

One run is one directory::

    config.json     the study's name ("study"), its settings (the command's arguments), the model, the data and
                    the seeds, and the versions of Python, numpy, torch, transformers, kvprec (and the git commit
                    of the source tree when it is a checkout)
    raw.npz         every measurement as numpy arrays (np.savez_compressed; no pickled objects)
    analysis.json   ``Study.analyze(raw, config)``: a pure function of raw.npz and config.json
    report.md       ``Study.render_report(analysis, config)``: every number from analysis.json
    plots/*.png     ``Study.make_plots(raw, analysis, config, plots_dir)``
    other files     ``Study.derived_files(raw, config)`` (e.g. the novelty study's generated.txt), also from raw

so ``--reanalyze DIR`` rebuilds everything after raw.npz from raw.npz and config.json alone, byte for byte
(tested per study).

Writing is atomic: a run is written into a hidden temporary directory beside the target
(``.<name>.tmp-<pid>-<random>``) and renamed into place once every file is there. A run that fails or is
interrupted removes its temporary directory, so the target is never half written and never empty; a process killed
outright leaves its temporary behind, and the next run into the same parent removes temporaries whose process is
gone. Reanalysis writes its files into a temporary directory inside the run and then replaces each output.

The target is checked before anything runs (:func:`check_out`): a file is refused; an existing run directory is
refused unless ``force`` (then it is replaced, as a whole, only after the new run is complete); a non-empty
directory that is not a run directory is always refused, so ``--force`` can never delete unrelated files.
"""
from __future__ import annotations

import json
import os
import platform as _platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from ..._tempdirs import new_temporary, remove_dead_temporaries

#: the files of a complete run (plots/ and study-specific files come with them)
RUN_FILES = ("config.json", "raw.npz", "analysis.json", "report.md")


class StudyInputError(ValueError):
    """Bad input found before a study runs: the message names the argument (``--out``, ``--block-size``, ...) and
    what it accepts. kvprec/commands/study.py reports it in one line."""


@dataclass(frozen=True)
class Study:
    """How a study turns raw arrays into its outputs; every function reads only its arguments.

    analyze(raw, config) -> analysis (JSON-serialisable); render_report(analysis, config) -> markdown;
    make_plots(raw, analysis, config, plots_dir) -> names of the files written; derived_files(raw, config) ->
    {file name: text} of further outputs (optional)."""

    name: str
    analyze: Callable[[Dict[str, np.ndarray], dict], dict]
    render_report: Callable[[dict, dict], str]
    make_plots: Callable[[Dict[str, np.ndarray], dict, dict, Path], List[str]]
    derived_files: Optional[Callable[[Dict[str, np.ndarray], dict], Dict[str, str]]] = None


# ---------------------------------------------------------------------------------------------------------
# Reading

def load_raw(path) -> Dict[str, np.ndarray]:
    """raw.npz -> {name: array} (no pickles)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def is_run_dir(path) -> bool:
    """Whether ``path`` holds a run (its config.json and raw.npz)."""
    p = Path(path)
    return (p / "config.json").is_file() and (p / "raw.npz").is_file()


def read_run(path, study: str):
    """(raw, config) of the run in ``path``; StudyInputError when it is not a run of ``study``. Runs written before
    config.json named its study (precision runs) are taken as runs of the study asking."""
    p = Path(path)
    if not p.is_dir():
        raise StudyInputError(f"--reanalyze {path}: not a directory; give a run directory of `kvprec study {study}`")
    if not is_run_dir(p):
        raise StudyInputError(f"--reanalyze {path}: no config.json and raw.npz there, so not a study run")
    config = json.loads((p / "config.json").read_text())
    if config.get("study", study) != study:
        raise StudyInputError(f"--reanalyze {path}: a run of `kvprec study {config['study']}`, not of {study}")
    return load_raw(p / "raw.npz"), config


# ---------------------------------------------------------------------------------------------------------
# Checking the target

def check_out(out, *, force: bool = False) -> Path:
    """Check a run's target directory before anything runs (module docstring); returns it as a Path."""
    if out is None or str(out) == "":
        raise StudyInputError("--out: empty path; give a directory for the run")
    p = Path(out)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise StudyInputError(f"--out {out}: is a file, not a directory; give a path for the run directory")
    if p.is_dir() and any(p.iterdir()):
        if not is_run_dir(p):
            raise StudyInputError(f"--out {out}: a non-empty directory that is not a study run (no config.json and "
                                  "raw.npz); choose another path (--force replaces only run directories)")
        if not force:
            raise StudyInputError(f"--out {out}: a run directory is already there; pass --force to replace it, or "
                                  "choose another path")
    ancestor = p.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise StudyInputError(f"--out {out}: {ancestor} is a file, so the run directory cannot be created under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise StudyInputError(f"--out {out}: {ancestor} is not writable")
    return p


# ---------------------------------------------------------------------------------------------------------
# Writing

def write_json(path: Path, data) -> None:
    """The one JSON format of run files: indented, sorted keys, trailing newline (stable bytes for --reanalyze)."""
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _derive(study: Study, d: Path, raw: Dict[str, np.ndarray], config: dict) -> dict:
    """Write analysis.json, report.md, plots/ and the derived files of ``raw`` and ``config`` into ``d``."""
    analysis = study.analyze(raw, config)
    write_json(d / "analysis.json", analysis)
    (d / "report.md").write_text(study.render_report(analysis, config) + "\n")
    study.make_plots(raw, analysis, config, d / "plots")
    if study.derived_files is not None:
        for name, text in study.derived_files(raw, config).items():
            (d / name).write_text(text)
    return analysis


def _remove_dead_temporaries(parent: Path, name: str) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` left by a process that no longer exists."""
    for what in ("tmp", "old"):
        remove_dead_temporaries(parent, f".{name}.{what}-")


def _put_in_place(tmp: Path, out: Path) -> None:
    """Rename the complete ``tmp`` to ``out``; an existing ``out`` (empty, or a run when forced) is moved aside
    first and removed after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
    os.rename(out, aside / "run")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside / "run", out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def write_run(study: Study, out, config: dict, raw: Dict[str, np.ndarray], *, force: bool = False) -> dict:
    """Write a complete run of ``study`` to ``out`` atomically (module docstring); returns analysis.json's content.

    ``config`` must say ``"study": study.name``. The outputs are computed from raw.npz as written (read back), so
    the run and a later ``--reanalyze`` see the same arrays."""
    if config.get("study") != study.name:
        raise ValueError(f"write_run: config['study'] is {config.get('study')!r}, not {study.name!r}")
    out = check_out(out, force=force)  # again: the target may have appeared while the study ran
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(parent, out.name)
    tmp = new_temporary(parent, f".{out.name}.tmp-")
    try:
        write_json(tmp / "config.json", config)
        np.savez_compressed(tmp / "raw.npz", **raw)
        analysis = _derive(study, tmp, load_raw(tmp / "raw.npz"), config)
        _put_in_place(tmp, out.absolute())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return analysis


def reanalyze(study: Study, run_dir) -> dict:
    """Recompute analysis.json, report.md, plots/ and the derived files of ``run_dir`` from its raw.npz and
    config.json; each output is replaced only once all of them are computed. Returns analysis.json's content."""
    raw, config = read_run(run_dir, study.name)
    d = Path(run_dir)
    tmp = Path(tempfile.mkdtemp(dir=d, prefix=".reanalyze-"))
    try:
        analysis = _derive(study, tmp, raw, config)
        for entry in sorted(tmp.iterdir()):
            target = d / entry.name
            if entry.is_dir():
                if target.exists():
                    aside = tmp / f".{entry.name}.old"
                    os.rename(target, aside)
                os.rename(entry, target)
            else:
                os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return analysis


# ---------------------------------------------------------------------------------------------------------
# What config.json records about the environment

def _version(package: str) -> Optional[str]:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """The commit of the source tree kvprec runs from, when it is a git checkout (else None)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def versions() -> dict:
    """Versions of what produced a run: Python, numpy, scipy, torch, transformers, kvprec, the git commit."""
    return {"python": _platform.python_version(), "numpy": np.__version__, "scipy": _version("scipy"),
            "torch": _version("torch"), "transformers": _version("transformers"), "kvprec": _version("kvprec"),
            "git_commit": _git_commit(), "machine": _platform.machine()}


def run_config(study: str, settings: dict, *, model: dict, data: dict, seeds: dict) -> dict:
    """config.json of a run: the study's settings (the arguments, flat, as its analysis reads them) and the
    platform's keys: ``study``, ``versions``, ``model_info``, ``data``, ``seeds``."""
    reserved = {"study", "versions", "model_info", "data", "seeds"} & set(settings)
    if reserved:
        raise ValueError(f"run_config: settings may not use the platform's keys {sorted(reserved)}")
    return {**settings, "study": study, "versions": versions(), "model_info": model, "data": data, "seeds": seeds}
