"""The run-directory contract of every study (kvprec/studies/platform/rundir.py, command.py, progress.py).

A stand-in study (a sum, a line of text, one plot file) exercises the contract quickly; the command-line cases use
`kvprec study precision`, whose refusals all happen before a model is loaded."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvprec.studies.platform import rundir
from kvprec.studies.platform.progress import Progress
from kvprec.studies.platform.rundir import Study, StudyInputError


def _analyze(raw, config):
    return {"total": float(raw["x"].sum()), "n": int(raw["x"].size), "scale": config["scale"]}


def _report(a, config):
    return f"# stand-in\n\ntotal {a['total']:.3f} over {a['n']} values"


def _plots(raw, a, config, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "x.txt").write_text(" ".join(f"{v:.4f}" for v in raw["x"]))
    return ["x.txt"]


def _derived(raw, config):
    return {"values.txt": "\n".join(map(str, raw["x"].tolist())) + "\n"}


STANDIN = Study("standin", _analyze, _report, _plots, _derived)


def _config(**settings):
    return rundir.run_config("standin", {"scale": 2.0, **settings}, model={"name": "none"}, data={"source": "test"},
                             seeds={"seed": 0})


def _raw(seed=0):
    return {"x": np.random.default_rng(seed).normal(size=7), "labels": np.array(["a", "b"])}


def _hidden_entries(parent: Path):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_run_has_every_file_and_its_analysis_comes_from_raw_npz(tmp_path):
    out = tmp_path / "runs" / "one"  # the parent does not exist yet
    a = rundir.write_run(STANDIN, out, _config(), _raw())
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "config.json", "plots", "raw.npz", "report.md",
                                                     "values.txt"]
    raw = rundir.load_raw(out / "raw.npz")
    assert a == json.loads((out / "analysis.json").read_text()) == {"total": float(raw["x"].sum()), "n": 7,
                                                                    "scale": 2.0}
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == "standin" and config["seeds"] == {"seed": 0} and config["data"] == {"source": "test"}
    assert {"python", "numpy", "torch", "transformers", "kvprec", "git_commit"} <= set(config["versions"])
    assert (out / "plots" / "x.txt").is_file() and (out / "values.txt").read_text().count("\n") == 7
    assert _hidden_entries(out.parent) == []  # no temporary left beside it


@pytest.mark.parametrize("where", ["analyze", "plots"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_or_interrupted_run_leaves_nothing(tmp_path, where, error):
    def boom(*args):
        raise error("stop")
    broken = Study("standin", boom if where == "analyze" else _analyze, _report,
                   boom if where == "plots" else _plots)
    out = tmp_path / "run"
    with pytest.raises(error):
        rundir.write_run(broken, out, _config(), _raw())
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # An existing run replaced with --force survives a failed replacement whole.
    rundir.write_run(STANDIN, out, _config(), _raw(1))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(error):
        rundir.write_run(broken, out, _config(), _raw(2), force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert _hidden_entries(tmp_path) == []


def test_an_existing_run_needs_force_and_other_directories_are_never_replaced(tmp_path):
    out = tmp_path / "run"
    rundir.write_run(STANDIN, out, _config(), _raw(0))
    first = (out / "analysis.json").read_bytes()
    with pytest.raises(StudyInputError, match="--out .*a run directory is already there; pass --force"):
        rundir.write_run(STANDIN, out, _config(), _raw(1))
    assert (out / "analysis.json").read_bytes() == first
    rundir.write_run(STANDIN, out, _config(), _raw(1), force=True)
    assert (out / "analysis.json").read_bytes() != first
    assert _hidden_entries(tmp_path) == []

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(StudyInputError, match="not a study run"):
        rundir.write_run(STANDIN, other, _config(), _raw(), force=True)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StudyInputError, match="--out .*is a file"):
        rundir.check_out(afile, force=True)
    with pytest.raises(StudyInputError, match="is a file, so the run directory cannot be created"):
        rundir.check_out(afile / "sub" / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    rundir.write_run(STANDIN, empty, _config(), _raw())  # an empty directory is no run: filled without --force
    assert rundir.is_run_dir(empty)


def test_reanalyze_reproduces_every_output_byte_for_byte(tmp_path):
    out = tmp_path / "run"
    rundir.write_run(STANDIN, out, _config(), _raw(3))
    files = ("analysis.json", "report.md", "values.txt", "plots/x.txt")
    before = {f: (out / f).read_bytes() for f in files}
    for f in files:
        (out / f).write_text("stale")
    (out / "plots" / "old.png").write_text("from an older version")
    assert rundir.reanalyze(STANDIN, out) == json.loads(before["analysis.json"])
    assert {f: (out / f).read_bytes() for f in files} == before
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["x.txt"]  # plots/ replaced as a whole
    assert _hidden_entries(out) == []
    with pytest.raises(StudyInputError, match="a run of `kvprec study standin`, not of precision"):
        rundir.read_run(out, "precision")
    with pytest.raises(StudyInputError, match="no config.json and raw.npz"):
        rundir.reanalyze(STANDIN, tmp_path)


def test_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".run.tmp-{dead}-abc").mkdir()
    (tmp_path / f".run.old-{dead}-abc").mkdir()
    (tmp_path / f".run.tmp-{os.getppid()}-abc").mkdir()  # a live process's run in progress
    rundir.write_run(STANDIN, tmp_path / "run", _config(), _raw())
    assert _hidden_entries(tmp_path) == [f".run.tmp-{os.getppid()}-abc"]


def test_run_config_keeps_the_platform_keys_apart():
    with pytest.raises(ValueError, match="platform's keys"):
        rundir.run_config("standin", {"seeds": 1}, model={}, data={}, seeds={})
    with pytest.raises(ValueError, match="config\\['study'\\]"):
        rundir.write_run(STANDIN, "/nonexistent/never", {"study": "other"}, _raw())


def test_progress_is_silent_when_quiet_and_logs_otherwise():
    stream = io.StringIO()
    p = Progress(stream=stream)
    p.log("collecting")
    assert list(p.bar(range(3), desc="steps")) == [0, 1, 2]
    text = stream.getvalue()
    assert "] collecting" in text and "steps" in text
    quiet = Progress(quiet=True, stream=stream)
    items = [1, 2]
    assert quiet.bar(items) is items
    quiet.log("nothing")
    assert "nothing" not in stream.getvalue()


# ---- the command line: refusals before anything runs -----------------------------------------------------------

def _cli(*argv):
    from kvprec.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value


@pytest.mark.parametrize("args, message", [
    (["--block-size", "0"], "--block-size 0: use a power of two"),
    (["--block-size", "12"], "--block-size 12: use a power of two"),
    (["--context", "8"], "--context 8: the calibration context needs at least one block"),
    (["--queries", "0"], "--queries 0: use a whole number >= 1"),
    (["--budget", "-1"], "--budget -1.0: use a finite number > 0"),
    (["--text", "/no/such/file"], "--text /no/such/file: no such file"),
    (["--threads", "0"], "--threads 0: use a whole number >= 1"),
])
def test_bad_study_arguments_fail_in_one_line_and_create_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    stop = _cli("study", "precision", *args, "--out", str(out))
    assert stop.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_out_naming_a_file_or_an_existing_run_is_refused_before_the_model_loads(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert _cli("study", "precision", "--model", "/no/such/model", "--out", str(afile)).code == 2
    assert "--out" in capsys.readouterr().err and afile.read_text() == "keep"
    run = tmp_path / "run"
    rundir.write_run(STANDIN, run, _config(), _raw())
    before = (run / "analysis.json").read_bytes()
    assert _cli("study", "precision", "--model", "/no/such/model", "--out", str(run)).code == 2
    assert "pass --force" in capsys.readouterr().err and (run / "analysis.json").read_bytes() == before
    # --reanalyze of another study's run names the study it belongs to
    assert _cli("study", "precision", "--reanalyze", str(run)).code == 2
    assert "a run of `kvprec study standin`" in capsys.readouterr().err


def test_a_model_that_fails_to_load_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "deep" / "run"
    assert _cli("study", "precision", "--model", str(tmp_path / "missing-model"), "--out", str(out)).code == 2
    assert "--model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
