"""``imprag bench engines`` argument handling (no engine started here; the measurement
itself runs in tests/vllm/test_vllm_engine.py on the module's engine)."""

from __future__ import annotations

import pytest

from imprag_ray.bench.engines import make_requests
from imprag_ray.cli import main


@pytest.mark.parametrize("flag", ["--requests", "--max-new-tokens", "--max-num-seqs"])
def test_non_positive_sizes_exit_2_naming_the_flag(flag, capsys):
    assert main(["bench", "engines", flag, "0"]) == 2
    assert flag in capsys.readouterr().err


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["bench", "engines", "--checkpoint", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_requests_have_k_passages_within_l_max():
    reqs = make_requests(5, vocab_size=100, k=3, l_max=10, prompt_tokens=6, max_new_tokens=4)
    assert len(reqs) == 5 and len({r.prompt_ids for r in reqs}) == 5
    for r in reqs:
        assert r.prompt_ids[0] == 1 and len(r.prompt_ids) == 6
        assert len(r.passages) == 3 and all(5 <= len(p) <= 10 for p in r.passages)
        assert all(8 <= t < 100 for p in r.passages for t in p)
