"""The demo's closing "next" commands work when pasted into a new shell: the first printed line puts `gptrain`
(installed in .venv) on the PATH."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def printed_next_steps(chat: bool) -> list[str]:
    """The lines demo.sh echoes after its run, with $root and $run as a user sees them."""
    script = (ROOT / "scripts" / "demo.sh").read_text()
    tail = script[script.index('if [ "$chat" = 1 ]; then\n  # SFT'):]
    branch = tail.split("\nelse\n")[0 if chat else 1]
    lines = [m.group(1) for m in re.finditer(r'^\s*echo "(  .*)"$', branch, re.M)]
    return [line.strip().replace("$root", str(ROOT)).replace("$run", "runs/demo") for line in lines]


@pytest.mark.parametrize("chat", [False, True])
def test_the_printed_next_steps_start_with_the_line_a_new_shell_needs(chat):
    lines = printed_next_steps(chat)
    assert lines[0] == f"cd {ROOT} && . .venv/bin/activate"
    assert all(line.startswith(("gptrain ", "bash scripts/")) for line in lines[1:]) and len(lines) > 1
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("no .venv in this checkout (scripts/setup_env.sh makes it)")
    # a new shell: no inherited PATH or virtual environment
    p = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "HOME=/tmp", "bash", "-c",
                        f"{lines[0]} && command -v gptrain"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == str(ROOT / ".venv" / "bin" / "gptrain"), p.stderr
