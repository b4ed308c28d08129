"""The shared click options: choices from the pipeline's constants, and no import cycle."""

import subprocess
import sys

from pertoken.backends import _REGISTRY, BACKENDS
from pertoken.backends.base import POSITIONS
from pertoken.cli import main
from pertoken.pipeline.export import FORMATS
from pertoken.pipeline.extract import METHODS
from pertoken.pipeline.generate import POLARITIES


def choices(command, option, group=main):
    (param,) = [p for p in group.commands[command].params if p.name == option]
    return tuple(param.type.choices)


def test_choices_come_from_the_constants():
    assert BACKENDS == ("auto", *_REGISTRY)  # the light names list the registry's backends
    for command in ("generate", "extract", "run", "steer", "eval", "monitor", "project", "vet"):
        assert choices(command, "backend") == BACKENDS, command
    assert choices("judge", "backend") == BACKENDS
    for command in ("steer", "eval", "monitor"):
        assert choices(command, "positions") == POSITIONS, command
    assert choices("extract", "method") == choices("run", "method") == METHODS
    assert choices("generate", "polarity") == POLARITIES
    assert choices("export", "fmt") == FORMATS


def test_the_commands_do_not_import_the_cli():
    code = (
        "import sys;"
        "from pertoken.commands import env, extraction, files, options, steering, vet;"
        "print('pertoken.cli' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_run_help_the_readme_and_generate_agree_on_the_cpu_batch_size():
    import re
    from pathlib import Path

    from click.testing import CliRunner

    from pertoken.cli import main
    from pertoken.pipeline.generate import _default_slots

    class Cpu:
        device = "cpu"

    text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    helped = int(re.search(r"--batch-size INTEGER .*?else (\d+)\)", text).group(1))
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    said = r"`--batch-size` of them decoding at once \(default: .*?, (\d+) on a CPU"
    documented = re.search(said, readme).group(1)
    assert helped == int(documented) == _default_slots(Cpu()) == 16
