"""README.md followed literally: every fenced ```bash block runs in order, as written, in one shell.

The blocks run in a fresh folder standing in for a clone (``.venv`` links to the venv running the tests,
``../shared/data/mvtec_ad`` is a small generated MVTec-layout root whose one category is named ``bottle``),
with ``FSAD_SWEEP_CONFIG`` giving ``fsad run`` a small sweep, the variable README documents for that. A
block the test cannot run (an install, a server that runs until stopped) carries the marker
``<!-- not run by the README test: why -->`` on the line above it, in README itself, so a new block is run
unless it says why not. A block that installs and then runs (README's first command) carries
``<!-- the README test runs this block after its install: why -->``: the test runs what follows the install
(``python3 -m venv .venv && .venv/bin/pip install ... &&``), as the stand-in's ``.venv`` is the venv running the
tests. Every repository path README names must exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- not run by the README test: (?P<why>\S.*?) -->$")
AFTER_INSTALL = re.compile(r"^<!-- the README test runs this block after its install: (?P<why>\S.*?) -->$")
INSTALL = re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install [^&\n]+ && (?=\S)")
FENCE = "```"

# Folders of the repository whose files README names by path. A path into any other folder is a run's
# output (dagster_home/, bottle_home/, .cluster/, predictions/) or outside the checkout (../shared).
SOURCE_DIRS = (".ci", "benchmarks", "deploy", "docs", "fewshot_core", "pipelines", "tests")
REPO_PATH = re.compile(r"(?<![\w./$-])((?:%s)/[\w./*-]*[\w*])" % "|".join(re.escape(d) for d in SOURCE_DIRS))
# a bare file name (no folder) names a file somewhere in the repository, e.g. `workspace.yaml`, `dagster.yaml`
FILE_NAME = re.compile(r"(?<![\w./$-])([\w-]+\.(?:py|yaml|yml|toml|md|cfg))(?![\w/])")

# The small sweep the test's `fsad run` commands read (FSAD_SWEEP_CONFIG): one fast method, one shot, one seed.
SWEEP = """\
name: readme
data: {synth: {categories: 1, size: 64, n_train: 6, n_test_good: 4, n_test_per_defect: 2}}
image_size: 64
oneclass: {shots: [1], seeds: [0]}
methods: [{id: knn, method: knn}]
"""
# Variables that would point the commands at another home, store, data root or cluster than the test's.
CLEARED = ("DAGSTER_HOME", "FSAD_HOME", "FSAD_SHARED", "FSAD_SWEEP_CONFIG", "MVTEC_ROOT", "MTD_ROOT",
           "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FSAD_PROFILE", "FSAD_PROFILE_CONFIG", "FSAD_CLUSTER_HOME")


@dataclass
class Block:
    line: int  # README line of the opening fence
    code: str
    skip: str | None  # the marker's reason, None when the block is run
    after_install: bool = False  # run what follows the block's install (AFTER_INSTALL)

    @property
    def command(self) -> str:
        """What the test runs of the block."""
        if not self.after_install:
            return self.code
        install = INSTALL.match(self.code)
        assert install, f"README.md:{self.line}: the block is marked as run after its install but does not start " \
                        "with `python3 -m venv .venv && .venv/bin/pip install ... && `"
        return self.code[install.end():]


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks in order. Every fence must be ```bash (so no command hides in an untagged block)
    and every marker must sit on the line right above one."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        if (MARKER.match(line) or AFTER_INSTALL.match(line)) and not (i + 1 < len(lines)
                                                                       and lines[i + 1].startswith(FENCE)):
            raise AssertionError(f"README.md:{i + 1}: the marker is not right above a ``` block: {line}")
        if line.startswith("<!-- not run") and not MARKER.match(line):
            raise AssertionError(f"README.md:{i + 1}: write the marker as `<!-- not run by the README test: why -->`")
        if line.startswith(FENCE):
            if line != FENCE + "bash":
                raise AssertionError(f"README.md:{i + 1}: fenced block {line!r}; README's blocks are ```bash")
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == FENCE), None)
            assert end is not None, f"README.md:{i + 1}: block never closed"
            mark = MARKER.match(lines[i - 1].strip()) if i else None
            after = bool(i and AFTER_INSTALL.match(lines[i - 1].strip()))
            blocks.append(Block(i + 1, "\n".join(lines[i + 1:end]), mark["why"] if mark else None, after))
            i = end
        i += 1
    return blocks


def test_blocks_are_parsed_and_markers_are_strict():
    text = "a\n<!-- not run by the README test: a server -->\n```bash\nserve &\n```\n\n```bash\nls\nls -a\n```\n"
    assert readme_blocks(text) == [Block(3, "serve &", "a server"), Block(7, "ls\nls -a", None)]
    installs = ("<!-- the README test runs this block after its install: the venv is the test's -->\n```bash\n"
                "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/fsad run\n```\n")
    (block,) = readme_blocks(installs)
    assert block.after_install and block.command == ".venv/bin/fsad run"
    (unmarked,) = readme_blocks(installs.split("\n", 1)[1])
    assert unmarked.command == unmarked.code
    with pytest.raises(AssertionError, match="does not start with"):
        _ = readme_blocks(installs.replace("python3 -m venv .venv && ", ""))[0].command
    for bad in ("```\nls\n```\n", "```sh\nls\n```\n", "<!-- not run by the README test: x -->\n\n```bash\nls\n```\n",
                "<!-- not run: x -->\n```bash\nls\n```\n", "```bash\nls\n"):
        with pytest.raises(AssertionError):
            readme_blocks(bad)


def test_every_repository_path_readme_names_exists():
    text = README.read_text()
    names = {p.name for d in SOURCE_DIRS for p in (ROOT / d).rglob("*") if p.is_file()}
    names |= {p.name for p in ROOT.iterdir() if p.is_file()}
    paths = set(REPO_PATH.findall(text))
    assert {"benchmarks/cluster_sweep.yaml", "deploy/cluster.yaml", "pipelines/config.py"} <= paths  # the regex works
    missing = sorted(p for p in paths if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists()))
    assert not missing, f"README.md names paths that do not exist: {missing}"
    files = set(FILE_NAME.findall(text))
    assert {"workspace.yaml", "pyproject.toml"} <= files
    unknown = sorted(f for f in files if f not in names)
    assert not unknown, f"README.md names files the repository does not hold: {unknown}"


def _bottle_stand_in(shared: Path) -> Path:
    """``shared/data/mvtec_ad/bottle``: a generated category with enough images for README's commands
    (10 good shots for the supervised example, 2 images per defect type: a shot and a query) and a
    ``contamination`` defect type, as real bottle has. Kept small: the zero-shot example scores every
    test image against every other."""
    from fewshot_core.data.synth import generate

    root = shared / "data" / "mvtec_ad"
    gen = shared / "generated"
    (name,) = generate(gen, categories=1, seed=0, size=64, n_train=6, n_test_good=14, n_test_per_defect=2,
                       kinds=("disk",))
    root.mkdir(parents=True)
    (gen / name).rename(root / "bottle")
    assert (root / "bottle" / "test" / "contamination" / "000.png").is_file()
    return root


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a few minutes alone; the shared 2-core machine runs several suites at once
def test_readme_commands_run_as_written(tmp_path):
    blocks = readme_blocks(README.read_text())
    run = [b for b in blocks if b.skip is None]
    assert len(run) >= 3 and any("fsad predict" in b.code for b in run)
    venv = Path(sys.prefix)
    assert (venv / "bin" / "fsad").is_file(), f"{venv}/bin/fsad missing: install the checkout (README's first command)"
    clone = tmp_path / "checkout"
    clone.mkdir()
    (clone / ".venv").symlink_to(venv)
    _bottle_stand_in(tmp_path / "shared")
    sweep = tmp_path / "readme_sweep.yaml"
    sweep.write_text(SWEEP)
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    # the checkout under test is what the commands import, whatever checkout the venv was installed from
    env.update(PYTHONPATH=str(ROOT), FSAD_SWEEP_CONFIG=str(sweep), FSAD_SHARED=str(tmp_path / "shared"),
               HF_HUB_OFFLINE="1")
    script = ["set -euo pipefail",
              "trap 'echo \"README test: exit $? from: $BASH_COMMAND\"' ERR",
              "PS4='+T${SECONDS}s '", "set -x"]  # each command traced with its start time
    for b in run:
        script += [f"echo \">>> README.md line {b.line} (at ${{SECONDS}}s)\"", b.command]
    script.append('echo "=== README blocks done (at ${SECONDS}s)"')
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=clone, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=2100)
    out = proc.stdout
    # where the time goes (shown with -rP or -s): each block's and each command's start (bash's trace)
    print("\n".join(re.findall(r"^(?:>>>|===|\+T\d+s (?!echo )).*$", out, flags=re.M)))
    if proc.returncode != 0:
        where = re.findall(r">>> README.md line (\d+)", out)
        failed = re.findall(r"README test: exit (\d+) from: (.*)", out)
        pytest.fail(f"README.md block at line {where[-1] if where else '?'}: "
                    f"{failed[-1][1] if failed else 'a command'} failed (exit {proc.returncode})\n{out[-6000:]}")
    # what the commands were to produce is there
    assert len(re.findall(r"^>>> README.md line", out, flags=re.M)) == len(run)
    assert (clone / "dagster_home" / "fsad" / "report" / "report.html").is_file()
    assert "0 damaged" in out and "--store dagster_home/fsad/features" in "\n".join(b.code for b in run)
    assert list((clone / "predictions").glob("*.csv")), sorted(p.name for p in (clone / "predictions").iterdir())
    assert (clone / "served-model" / "MLmodel").is_file()
    assert '"dataframe_split"' in (clone / "request.json").read_text()
