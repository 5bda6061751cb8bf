"""The watermark's gamma and delta: read once from the launcher's env vars, applied by the sampler."""

from __future__ import annotations

import pytest
import torch

from shard.config import build_config
from shard.sampling import Sampler, SamplingParams, _greenlist_mask
from shard.watermark import Watermark

VOCAB = 64


def _config():
    return build_config(None, revision=None, uds_path="/tmp/pytgi-test", sharded=False, dtype=None,
                        trust_remote_code=False, json_output=False, log_level="info")


def test_env_vars_reach_the_config(monkeypatch):
    monkeypatch.delenv("WATERMARK_GAMMA", raising=False)
    monkeypatch.delenv("WATERMARK_DELTA", raising=False)
    assert _config().watermark == Watermark(0.5, 2.0)  # TGI's defaults
    monkeypatch.setenv("WATERMARK_GAMMA", "0.25")
    monkeypatch.setenv("WATERMARK_DELTA", "7.5")
    assert _config().watermark == Watermark(0.25, 7.5)
    monkeypatch.setenv("WATERMARK_GAMMA", "1.5")
    with pytest.raises(ValueError, match="watermark gamma must be in"):
        _config()


def test_gamma_sizes_the_green_list():
    for gamma in (0.1, 0.5, 0.9):
        assert int(_greenlist_mask([3], VOCAB, gamma).sum()) == int(VOCAB * gamma)


def _chosen(watermark: Watermark) -> int:
    params = [SamplingParams(watermark=True)]  # greedy
    sampler = Sampler.build(params, [[5]], [[]], VOCAB, torch.device("cpu"), watermark)
    logits = torch.zeros(1, VOCAB)
    green = _greenlist_mask([5], VOCAB, watermark.gamma)[0]
    red = int((~green).nonzero()[0])
    logits[0, red] = 1.0  # the best token is red: only the green bonus can overturn it
    out = sampler(logits)
    sampler2 = Sampler.concatenate([sampler, sampler.filter([0])])  # carried through batch changes
    assert sampler2.watermark == watermark
    return int(out.next_ids[0]), red, green


def test_delta_is_the_green_bonus():
    token, red, _ = _chosen(Watermark(0.5, 0.5))  # bonus below the red token's lead
    assert token == red
    token, red, green = _chosen(Watermark(0.5, 2.0))
    assert token != red and bool(green[token])
