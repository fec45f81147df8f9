"""The command line: arguments read before torch is imported, and ``--help``'s defaults."""

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from unisd_fast.config import IMPLS
from unisd_fast.train.config import DEFAULT_CONFIG, TrainConfig, build_parser, parse_args

ROOT = Path(__file__).resolve().parents[2]
# main(argv) in a fresh interpreter: its exit status and the heavy modules it imported.
PROBE = """
import sys
from unisd_fast.train.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:
    status = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
print(status, heavy[:3])
"""


def probe(*args: str) -> tuple[str, str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.stdout.strip().splitlines()[-1], result.stderr


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--help"], "0", ""),
        (["--lr", "fast"], "2", "argument --lr: invalid float value: 'fast'"),
        (["--method", "magic"], "2", "argument --method: invalid choice: 'magic'"),
        (["--lr", "inf"], "2", "unisd-train: error: lr must be finite, got inf"),
        (["--method", "sft", "--clip", "1"], "2", "method sft trains with cross-entropy"),
    ],
    ids=["help", "type", "choice", "value", "combination"],
)
def test_help_and_argument_errors_import_no_torch(args, status, message):
    last, err = probe(*args)
    assert last == f"{status} []", err
    assert message in err


def test_help_takes_little_cpu_time():
    """CPU time, not wall time, so that a busy machine does not fail it (measured: 0.1 s;
    importing torch and transformers first took 7 s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, "-m", "unisd_fast.train", "--help"]
    subprocess.run(command, cwd=ROOT, capture_output=True, check=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 1.5


def test_help_shows_the_default_runs_values_one_default_per_flag():
    parser = build_parser()
    bare = parse_args([])
    shown = {a.dest: a.help for a in parser._actions if a.dest in bare.to_dict()}
    assert set(shown) == set(bare.to_dict())
    for name, text in shown.items():
        assert text.count("default") == 1, (name, text)
        if getattr(bare, name) is not None:
            assert text.endswith(f"(default: {getattr(bare, name)})"), (name, text)
    assert shown["lr"].endswith("(default: 0.002)") and shown["lora_r"].endswith("(default: 0)")
    assert shown["batch_size"].endswith("(default: 32)")
    assert shown["max_steps"].endswith("(default: 400)")
    assert shown["temperature"].endswith("(default: the method's, unisd_star: 0.7)")
    epilog = " ".join(parser.epilog.split())
    assert str(DEFAULT_CONFIG) in epilog
    for flag, value in (("lr", TrainConfig.lr), ("lora_r", 64), ("batch_size", 4)):
        assert f"--{flag.replace('_', '-')} {value}," in epilog
    assert next(a for a in parser._actions if a.dest == "loss_impl").choices == IMPLS
