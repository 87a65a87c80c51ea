"""The README's commands are real: every script or module a README code block runs exists, answers --help, and
knows every flag the README gives it (a renamed or removed flag fails here, not in a newcomer's terminal)."""
import re
import subprocess
import sys

import pytest

from helpers_model import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script or -m module, its flags) for every `python ...` / `torchrun ...` command of the README's code blocks,
    continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").replace("&&", "\n").splitlines():  # one command a line
            tokens = line.split("#")[0].split()
            if not tokens or tokens[0] not in ("python", "torchrun"):
                continue
            if tokens[0] == "python" and len(tokens) > 2 and tokens[1] == "-m":
                target = "-m " + tokens[2]
                if target.split()[1] in ("pytest", "venv", "pip"):
                    continue
            else:
                target = next((t for t in tokens if t.endswith(".py")), None)
                if target is None:
                    continue
            after = tokens[tokens.index(target.split()[-1]) + 1:]  # the script's own flags (not torchrun's)
            flags = [t.split("=")[0] for t in after if t.startswith("--")]
            commands.append((target, flags))
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    scripts = {t for t, _ in COMMANDS}
    assert {"train.py", "compute_lora_diff.py", "generate_images.py", "generate_images_nsfw.py",
            "compute_metrics.py", "-m scripts.experiments.e2e_toy"} <= scripts, scripts


@pytest.mark.parametrize("target", sorted({t for t, _ in COMMANDS}))
def test_readme_flags_exist(target):
    cmd = [sys.executable, *target.split()] if target.startswith("-m") else [sys.executable, target]
    proc = subprocess.run(cmd + ["--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    known = set(re.findall(r"(--[A-Za-z0-9_]+)", proc.stdout))
    used = {f for t, flags in COMMANDS if t == target for f in flags}
    assert used <= known, f"{target}: the README uses {sorted(used - known)}, which --help does not list"
