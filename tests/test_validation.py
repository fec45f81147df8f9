"""Bad input to the config and the loss: each a clear error naming the argument."""

import pytest
import torch
from loss_inputs import make_inputs

import unisd_fast as usd
from unisd_fast.ops.checks import check_labels


@pytest.mark.parametrize(("fields", "error", "match"), [
    ({"divergence": "kl"}, ValueError, "divergence"),
    ({"jsd_alpha": 0.0}, ValueError, "jsd_alpha"),
    ({"jsd_alpha": 1.0}, ValueError, "jsd_alpha"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"clip": 1.0, "clip_quantile": 0.9}, ValueError, "exclusive"),
    ({"clip": -1.0}, ValueError, "clip"),
    ({"clip": 0}, ValueError, r"UniSDConfig.clip must be > 0, got 0; clip=0 clips every"),
    ({"clip": 0.0}, ValueError, r"UniSDConfig.clip must be > 0"),
    ({"clip_quantile": 1.5}, ValueError, "clip_quantile"),
    ({"clip_quantile": 0.0}, ValueError, r"UniSDConfig.clip_quantile must lie in \(0, 1\]"),
    ({"agreement": "views"}, ValueError, "agreement"),
    ({"agreement_stat": "std"}, ValueError, "agreement_stat"),
    ({"agreement_gamma": -1.0}, ValueError, "agreement_gamma"),
    ({"agreement_quantile": 2.0}, ValueError, "agreement_quantile"),
    ({"agreement_cap": 0.0}, ValueError, "agreement_cap"),
    ({"agreement_floor": 0.0}, ValueError, "agreement_floor"),
    ({"contrastive_weight": -0.1}, ValueError, "contrastive_weight"),
    ({"feature_weight": -1}, ValueError, "feature_weight"),
    ({"kd_weight": -1}, ValueError, "kd_weight"),
    ({"kd_weight": 0.0}, ValueError, "all 0"),
    ({"normalize": "batch"}, ValueError, "normalize"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
    ({"temperature": "hot"}, TypeError, "temperature"),
])
def test_config_errors(fields, error, match):
    with pytest.raises(error, match=match):
        usd.UniSDConfig(**fields)


def test_clip_edges_that_keep_a_gradient_are_accepted():
    assert usd.UniSDConfig(clip=1e-9).clip == 1e-9
    assert usd.UniSDConfig(clip_quantile=1.0).clip_quantile == 1.0
    assert usd.UniSDConfig(clip_quantile=1e-6).clip_quantile == 1e-6


def test_presets_and_defaults():
    assert usd.UniSDConfig().divergence == "fkl" and usd.UniSDConfig().temperature == 0.7
    star = usd.UniSDConfig.preset("unisd_star")
    assert (star.agreement, star.agreement_gamma, star.contrastive_weight,
            star.contrastive_margin, star.feature_weight, star.clip) == \
        ("token", 0.001, 0.01, 0.1, 0.01, None)
    assert usd.UniSDConfig.preset("gkd").divergence == "jsd"
    assert usd.UniSDConfig.preset("clip").clip == 10.0
    assert usd.UniSDConfig.preset("match_repr").kd_weight == 0.0
    assert usd.UniSDConfig.preset("sd", temperature=1.0).temperature == 1.0
    assert set(usd.PRESETS) == {"sd", "gkd", "clip", "agreement", "contrastive", "match",
                                "match_repr", "unisd_star"}
    with pytest.raises(ValueError, match="unknown preset"):
        usd.UniSDConfig.preset("sft")
    with pytest.raises(Exception, match="cannot assign"):
        star.temperature = 1.0


def call(inputs, cfg=None, **overrides):
    args = {**inputs, **overrides}
    return usd.unisd_loss(config=cfg or usd.UniSDConfig.preset("unisd_star"), impl="torch",
                          **args)


@pytest.fixture
def inputs():
    return make_inputs(B=2, T=3, V=11, K=3, H=4)


@pytest.mark.parametrize(("override", "error", "match"), [
    ({"student_logits": torch.randn(2, 3)}, ValueError, r"student_logits must have shape"),
    ({"student_logits": torch.zeros(2, 3, 11, dtype=torch.int64)}, TypeError,
     "student_logits must be a floating-point"),
    ({"student_logits": [[1.0]]}, TypeError, "student_logits must be a torch.Tensor"),
    ({"teacher_logits": torch.randn(2, 3, 12)}, ValueError, r"teacher_logits must have shape"),
    ({"teacher_logits": torch.randn(2, 3, 11, device="meta")}, ValueError,
     "teacher_logits is on meta but student_logits is on cpu"),
    ({"labels": torch.zeros(2, 3)}, TypeError, "labels must be an integer"),
    ({"labels": torch.zeros(2, 4, dtype=torch.long)}, ValueError, r"labels must have shape"),
    ({"labels": torch.full((2, 3), 11)}, ValueError,
     r"^labels must lie in \[0, 11\) or equal ignore_index=-100; found 11$"),
    ({"labels": torch.full((2, 3), -1)}, ValueError, "labels must lie"),
    ({"view_logits": None}, ValueError, "needs view_logits or view_logprobs"),
    ({"view_logits": torch.randn(1, 2, 3, 11)}, ValueError, "K >= 2"),
    ({"view_logits": torch.randn(3, 2, 3, 10)}, ValueError, r"view_logits\[0\] must have"),
    ({"view_logits": torch.randn(2, 3, 11)}, ValueError, r"view_logits must have shape"),
    ({"view_logits": "views"}, TypeError, "view_logits must be"),
    ({"view_logprobs": torch.randn(3, 2, 3)}, ValueError, "either view_logits or"),
    ({"view_logits": None, "view_logprobs": torch.randn(3, 2, 4)}, ValueError,
     r"view_logprobs must have shape"),
    ({"negative_logits": None}, ValueError, "needs negative_logits or negative_logprobs"),
    ({"negative_logits": torch.randn(2, 3, 5)}, ValueError, "negative_logits must have"),
    ({"student_hidden": None}, ValueError, "needs student_hidden and teacher_hidden"),
    ({"teacher_hidden": torch.randn(2, 3, 5)}, ValueError, "teacher_hidden must have"),
    ({"student_hidden": torch.randn(2, 3)}, ValueError, "student_hidden must have"),
    ({"num_items_in_batch": 4}, ValueError, "only accepted with normalize='token'"),
])
def test_loss_input_errors(inputs, override, error, match):
    with pytest.raises(error, match=match):
        call(inputs, **override)


@pytest.mark.parametrize("host_labels", [4096, 0])
@pytest.mark.parametrize(("labels", "found"), [
    ([[-100, 3, 12], [-5, 1, 0]], 12),
    ([[-100, -100, 0], [-5, 11, 0]], -5),
    ([[-100, 3, 10], [0, 1, -100]], None),
])
def test_label_check_as_a_list_and_as_tensor_ops(labels, found, host_labels):
    """Small CPU label tensors are checked as a Python list, larger ones with tensor ops:
    the same verdict and message, naming the first offending label."""
    y = torch.tensor(labels)
    if found is None:
        check_labels(y, 11, -100, host_labels)
        return
    with pytest.raises(ValueError, match=rf"^labels must lie in \[0, 11\) or equal "
                                         rf"ignore_index=-100; found {found}$"):
        check_labels(y, 11, -100, host_labels)


def test_num_items_errors(inputs):
    cfg = usd.UniSDConfig.preset("unisd_star", normalize="token")
    with pytest.raises(ValueError, match="num_items_in_batch must be > 0"):
        call(inputs, cfg, num_items_in_batch=0)
    with pytest.raises(TypeError, match="num_items_in_batch must be a number"):
        call(inputs, cfg, num_items_in_batch="4")
    with pytest.raises(ValueError, match="num_items_in_batch must be a scalar"):
        call(inputs, cfg, num_items_in_batch=torch.ones(2))


def test_config_and_impl_errors(inputs, monkeypatch):
    with pytest.raises(TypeError, match="config must be a UniSDConfig"):
        usd.unisd_loss(inputs["student_logits"], inputs["teacher_logits"], inputs["labels"],
                       config={"divergence": "fkl"})
    with pytest.raises(ValueError, match="impl must be one of"):
        usd.UniSDLoss(impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        usd.resolve_impl("fast", torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        usd.resolve_impl("triton", torch.device("cpu"))
    assert usd.resolve_impl("auto", torch.device("cpu")) == "torch"
    assert usd.resolve_impl("auto", torch.device("cuda")) == "triton"


def test_inplace_backward_needs_unit_stride_and_a_fused_impl(inputs):
    strided = torch.repeat_interleave(inputs["student_logits"], 2, -1)[..., ::2]
    with pytest.raises(ValueError, match="unit last stride"):
        call(inputs, student_logits=strided, inplace_backward=True)
    with pytest.raises(ValueError, match="impl='reference'"):
        usd.unisd_loss(config=usd.UniSDConfig.preset("unisd_star"), impl="reference",
                       inplace_backward=True, **inputs)


def test_module_matches_functional(inputs):
    cfg = usd.UniSDConfig.preset("unisd_star")
    module = usd.UniSDLoss(cfg, impl="torch")
    assert "impl='torch'" in repr(module)
    a = module(**inputs)
    b = call(inputs, cfg)
    assert torch.equal(a.loss, b.loss)
