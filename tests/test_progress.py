"""Progress bars count work as it finishes: rows per batch in extraction."""

from pertoken.pipeline.summaries import collect
from tests.fake_backend import FakeBackend


class Bar:
    def __init__(self):
        self.updates = []

    def update(self, n):
        self.updates.append(n)


def test_extraction_bar_moves_every_batch():
    fake = FakeBackend()
    rows = [{"prompt": f"p{i}", "answer": f"answer {i}"} for i in range(10)]
    bar = Bar()
    collect(fake, rows, keep=("response_avg",), batch_size=4, bar=bar)
    assert bar.updates == [4, 4, 2]
