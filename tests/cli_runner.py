"""`pertoken ...` invoked in-process, as the end-to-end tests drive it."""

from contextlib import contextmanager

from click.testing import CliRunner

from pertoken.cli import main


@contextmanager
def pertoken_cli(cache_dir):
    """Yield invoke(*args) -> output: a dummy key, a private judge cache, torch on one thread
    (a 64-wide model gains nothing from threads on a shared machine); a failing command fails
    the test with its output."""
    import torch

    env = {"OPENAI_API_KEY": "sk-test-dummy", "PERTOKEN_CACHE_DIR": str(cache_dir)}

    def invoke(*args):
        result = CliRunner().invoke(main, [str(a) for a in args], env=env)
        assert result.exit_code == 0, f"pertoken {' '.join(map(str, args))}:\n{result.output}"
        return result.output

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield invoke
    finally:
        torch.set_num_threads(n)
