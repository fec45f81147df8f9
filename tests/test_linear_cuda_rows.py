"""The fused-linear loss's CUDA choices, run on CPU: every row meeting the head (ignored ones
included, no host sync for the count of kept rows; ``linear_chunks.ALL_ROWS_DEVICES``), and
chunks of at least ``WEIGHT_CHUNK_ROWS`` rows when d W is accumulated on the whole-head
schedule. Both against the float64 materialised loss, as in tests/test_linear.py."""

import pytest
from linear_inputs import make_case
from test_linear import CHUNK, TILED, WHOLE_HEAD, V, check, config_and_kwargs, option_id

from unisd_fast.ops import linear_chunks

OPTIONS = ["sd", "unisd_star", {"clip_quantile": 0.6}, {"contrastive_weight": 0.5},
           {"divergence": "jsd", "normalize": "token"}]


@pytest.mark.parametrize("impl", [TILED, WHOLE_HEAD, "triton"],
                         ids=["tiled", "whole-head", "triton"])
@pytest.mark.parametrize("option", OPTIONS, ids=option_id)
def test_every_row_meets_the_head(option, impl, monkeypatch):
    monkeypatch.setattr(linear_chunks, "ALL_ROWS_DEVICES", frozenset({"cpu"}))
    cfg, kw = config_and_kwargs(option)
    case = make_case(B=2, T=5, V=V)
    assert (case["labels"] == cfg.ignore_index).any()
    seen = []
    scored = linear_chunks.scored_rows
    monkeypatch.setattr(linear_chunks, "scored_rows",
                        lambda *a, **k: seen.append(out := scored(*a, **k)) or out)
    check(case, cfg, impl, **kw)
    assert seen[0][0].tolist() == list(range(case["labels"].numel()))


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_weight_gradient_takes_larger_chunks(trainable, monkeypatch):
    case = make_case(B=2, T=7, V=V)
    H = case["student_hidden"].shape[-1]
    sizes = []
    ranges = linear_chunks.chunk_ranges
    monkeypatch.setattr(linear_chunks, "chunk_ranges",
                        lambda *a: sizes.append(a[-1]) or ranges(*a))
    check(case, config_and_kwargs("sd")[0], WHOLE_HEAD, trainable=trainable)
    # the student/teacher pass: CHUNK (three rows), or with d W the accumulator's bytes
    # (V x H float32: H / 2 rows of fp32 student/teacher logits), below 2048 rows
    assert sizes[-1] == (max(CHUNK, V * H * 4) if trainable else CHUNK)
