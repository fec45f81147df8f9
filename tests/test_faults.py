"""Faults a careful user hits with the loss API, each with its defined behaviour (docs/api.md,
"Errors" and "Non-finite logits")."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from loss_inputs import make_inputs

import unisd_fast as usd
from unisd_fast.ops import checks
from unisd_fast.validation import validate_inputs

IMPLS = ["reference", "torch", "triton"]
ROOT = Path(__file__).resolve().parents[1]


def loss(inputs, cfg, impl="torch", **kw):
    return usd.unisd_loss(config=cfg, impl=impl, **inputs, **kw)


@pytest.fixture
def inputs():
    return make_inputs(B=2, T=3, V=11, K=3, H=4)


@pytest.mark.parametrize("n", [
    torch.tensor(0), torch.tensor(-5), torch.tensor(0.0), torch.tensor(float("nan")),
    torch.tensor(float("inf")), torch.tensor([float("-inf")]), float("nan"), float("inf"),
    0, -1, 0.0,
], ids=repr)
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_num_items_in_batch_must_be_positive_and_finite(inputs, n, impl):
    cfg = usd.UniSDConfig(normalize="token")
    with pytest.raises(ValueError, match="num_items_in_batch must be > 0 and finite"):
        loss(inputs, cfg, impl, num_items_in_batch=n)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_num_items_in_batch_tensor_equals_number(inputs, impl):
    cfg = usd.UniSDConfig(normalize="token")
    expected = loss(inputs, cfg, impl, num_items_in_batch=7).loss
    for n in (torch.tensor(7), torch.tensor([7.0]), 7.0):
        torch.testing.assert_close(loss(inputs, cfg, impl, num_items_in_batch=n).loss, expected)
    with pytest.raises(TypeError, match="num_items_in_batch must be a real number tensor"):
        loss(inputs, cfg, num_items_in_batch=torch.tensor(True))


def test_value_checks_off_the_host_never_read_a_tensor(inputs, monkeypatch):
    # The CUDA path, run on CPU: with host checks off, the label and num_items checks go
    # through torch._assert_async (no .item(), no bool()); on CPU that assert raises at once,
    # on CUDA at the next sync.
    cfg = usd.UniSDConfig(normalize="token")
    args = [cfg, inputs["student_logits"], inputs["teacher_logits"], inputs["labels"],
            None, None, None, None, None, None]

    def sync(*_):
        raise AssertionError("host sync")

    monkeypatch.setattr(checks, "host_checks", lambda device: False)
    monkeypatch.setattr(torch.Tensor, "__bool__", sync)
    monkeypatch.setattr(torch.Tensor, "item", sync)
    validate_inputs(*args, torch.tensor(5))
    with pytest.raises(RuntimeError, match="num_items_in_batch must be > 0 and finite"):
        validate_inputs(*args, torch.tensor(float("nan")))
    args[3] = torch.full((2, 3), 11)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 11\)"):
        validate_inputs(*args, None)


def test_host_checks_only_off_cuda_or_when_asked(monkeypatch):
    monkeypatch.delenv("UNISD_FAST_SYNC_CHECKS", raising=False)
    assert checks.host_checks(torch.device("cpu"))
    assert not checks.host_checks(torch.device("cuda"))
    monkeypatch.setenv("UNISD_FAST_SYNC_CHECKS", "1")
    assert checks.host_checks(torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_validation_does_not_sync():
    inputs = make_inputs(B=2, T=3, V=11, K=3, H=4, device="cuda")
    cfg = usd.UniSDConfig.preset("unisd_star", normalize="token")
    n = torch.tensor(9, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        validate_inputs(cfg, inputs["student_logits"], inputs["teacher_logits"],
                        inputs["labels"], inputs["view_logits"], None,
                        inputs["negative_logits"], None, inputs["student_hidden"],
                        inputs["teacher_hidden"], n)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bad_label_raises_at_the_next_sync():
    script = textwrap.dedent("""
        import torch
        from unisd_fast import UniSDConfig
        from unisd_fast.validation import validate_inputs
        z = torch.randn(2, 3, 11, device="cuda")
        labels = torch.full((2, 3), 11, device="cuda")
        try:
            validate_inputs(UniSDConfig(), z, z, labels, *[None] * 7)
            print("validated")
            torch.cuda.synchronize()
        except Exception as error:
            print("raised:", type(error).__name__, error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert "validated\nraised: " in done.stdout, done.stdout + done.stderr[-2000:]
    assert "device-side assert" in done.stdout


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["expand_batch", "expand_time", "as_strided"])
def test_inplace_backward_rejects_rows_that_share_memory(inputs, impl, layout):
    base = inputs["student_logits"]
    if layout == "expand_batch":
        z = base[:1].clone().requires_grad_().expand(2, 3, 11)
    elif layout == "expand_time":
        z = base[:, :1].clone().requires_grad_().expand(2, 3, 11)
    else:
        z = base.clone().as_strided((2, 3, 11), (11, 5, 1)).requires_grad_()
    args = {**inputs, "student_logits": z}
    with pytest.raises(ValueError, match="inplace_backward=True needs student_logits whose "
                                         "elements do not share memory"):
        loss(args, usd.UniSDConfig.preset("unisd_star"), impl, inplace_backward=True)


def test_inplace_backward_keeps_strided_rows_that_do_not_overlap(inputs):
    cfg = usd.UniSDConfig.preset("unisd_star")
    longer = torch.cat([inputs["student_logits"], inputs["student_logits"][:, :1]], 1)
    grads = []
    for inplace in (False, True):
        z = longer.clone().requires_grad_()
        loss({**inputs, "student_logits": (z * 1.0)[:, :-1]}, cfg,
             inplace_backward=inplace).loss.backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[1], grads[0])


KEYS = ["student_logits", "teacher_logits", "view_logits", "negative_logits"]


def _put(inputs, key, row, col, value):
    x = inputs[key]
    if key == "view_logits":
        x[1, row[0], row[1], col] = value
    else:
        x[row[0], row[1], col] = value


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("at_label", [True, False], ids=["label_column", "other_column"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_inf_or_nan_in_an_active_row_gives_nan_in_every_impl(inputs, impl, key, at_label,
                                                              value):
    cfg = usd.UniSDConfig.preset("unisd_star")
    label = int(inputs["labels"][0, 0])
    _put(inputs, key, (0, 0), label if at_label else (label + 1) % 11, value)
    out = loss(inputs, cfg, impl)
    assert torch.isnan(out.loss)
    if key == "negative_logits":
        assert torch.isnan(out.contrastive)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_values_in_ignored_rows_stay_out(inputs, impl):
    cfg = usd.UniSDConfig.preset("unisd_star")
    inputs["labels"][1, 2] = -100
    expected = loss(inputs, cfg, "reference").loss
    for key in KEYS:
        _put(inputs, key, (1, 2), 4, float("inf"))
        _put(inputs, key, (1, 2), 6, float("nan"))
    torch.testing.assert_close(loss(inputs, cfg, impl).loss.double(), expected.double(),
                               atol=1e-6, rtol=1e-5)


def _env():
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.pop("TRITON_INTERPRET", None)
    return env


INTERPRET_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import unisd_fast as usd
    if sys.argv[1] == "kernels_first":
        import unisd_fast.backends.triton  # decorated for a GPU: the interpreter is off here
    os.environ["TRITON_INTERPRET"] = "1"
    z = torch.randn(1, 2, 9)
    labels = torch.tensor([[1, 4]])
    try:
        out = usd.unisd_loss(z, z + 0.1, labels, impl="triton")
    except RuntimeError as error:
        print("error:", error)
    else:
        ref = usd.unisd_loss(z, z + 0.1, labels, impl="reference")
        print("ok:", torch.allclose(out.loss, ref.loss, atol=1e-6))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter path")
@pytest.mark.parametrize(("order", "expected"), [
    ("kernels_first", "error: impl='triton' on CPU tensors: TRITON_INTERPRET=1 was set after "
                      "the Triton kernels were imported"),
    ("package_first", "ok: True"),
])
def test_triton_interpret_set_after_the_kernels_import(order, expected):
    done = subprocess.run([sys.executable, "-c", INTERPRET_SCRIPT, order], capture_output=True,
                          text=True, timeout=300, env=_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout, done.stdout + done.stderr[-3000:]
