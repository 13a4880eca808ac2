"""README.md runs as written: every ```python block executes top to bottom in a fresh namespace (on the built-in
tiny model, nothing downloaded), and every command of every ```bash block names something that exists and parses:
scripts are files bash can parse (`bash -n`), `kvprec ...` command lines parse with the CLI's own parser (the jobs,
minutes long, are not run), `python FILE` / `python -m pytest PATH` name files of the repository, other programs
are on PATH. A figure the text quotes from the example's output is checked against that output."""
import contextlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import kvprec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


def commands(block: str) -> list:
    """The simple commands of a bash block: comments dropped, continuations joined, split at && || ; |, each as
    argv without its leading VAR=value assignments."""
    text = re.sub(r"\\\n", " ", block)
    out = []
    for line in text.splitlines():
        line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
        for part in re.split(r"&&|\|\||;|\|", line):
            argv = shlex.split(part)
            while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                argv = argv[1:]
            if argv:
                out.append(argv)
    return out


PYTHON = blocks("python")
BASH = [argv for block in blocks("bash") for argv in commands(block)]


def test_the_readme_has_code_to_check():
    assert len(PYTHON) >= 2 and len(BASH) >= 3


@pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")
@pytest.mark.parametrize("index", range(len(PYTHON)), ids=[f"python{i + 1}" for i in range(len(PYTHON))])
def test_python_block_runs(index):
    torch.manual_seed(0)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(PYTHON[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    printed = stdout.getvalue()
    assert printed.strip(), "every README example prints what it shows"
    if index == 0:  # the text quotes the example's compression: it must be what the example prints
        quoted = re.search(r"prints a compression of ([0-9.]+)x", README)
        assert quoted is not None and f"compression vs FP16 {quoted.group(1)}x" in printed, printed


def check_command(argv: list) -> None:
    program, args = argv[0], argv[1:]
    if program in ("bash", "sh"):
        script = ROOT / args[0]
        assert script.is_file(), f"{script} does not exist"
        subprocess.run(["bash", "-n", str(script)], check=True)
    elif program == "kvprec":
        from kvprec.cli import build_parser

        parsed = build_parser().parse_args(args)  # argparse exits (status 2) on an unknown command or option
        assert callable(parsed.fn)
    elif program in ("python", "python3"):
        if args[:2] == ["-m", "pytest"]:
            paths = [a for a in args[2:] if not a.startswith("-")]
            assert paths and all((ROOT / p.split("::")[0]).exists() for p in paths), argv
        elif args[:1] == ["-m"]:
            import importlib.util

            assert importlib.util.find_spec(args[1]) is not None, argv
        else:
            assert (ROOT / args[0]).is_file(), argv
    else:
        assert shutil.which(program) or (ROOT / program).is_file(), f"{program}: not on PATH nor in the repository"


@pytest.mark.parametrize("argv", BASH, ids=[" ".join(a)[:60] for a in BASH])
def test_bash_command_exists_and_parses(argv):
    check_command(argv)


def test_every_kvprec_subcommand_has_help(capsys):
    from kvprec.cli import build_parser

    for sub in sorted({argv[1] for argv in BASH if argv[0] == "kvprec" and len(argv) > 1} | {"demo", "info"}):
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args([sub, "--help"])
        assert stop.value.code == 0
        assert "usage: kvprec " + sub in capsys.readouterr().out
