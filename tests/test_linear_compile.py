"""torch.compile of a training step that calls unisd_linear_loss: one graph (fullgraph=True
raises on any break), the op inside it as one node, and the eager result."""

import pytest
import torch
from linear_inputs import make_case

import unisd_fast as usd


class Step(torch.nn.Module):
    """A stand-in model body (one linear layer) and the fused-linear loss on its output."""

    def __init__(self, H, V):
        super().__init__()
        self.body = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x, teacher_hidden, labels, view_hidden, negative_hidden, cfg):
        out = usd.unisd_linear_loss(
            self.body(x), self.lm_head.weight, teacher_hidden, self.lm_head.weight, labels,
            view_hidden=view_hidden, negative_hidden=negative_hidden, logit_softcap=5.0,
            config=cfg, impl="torch", chunk_bytes=3 * 2 * 4 * self.lm_head.out_features)
        return out.loss, out.kd, out.token_weight


def _run(step, fn, case, cfg):
    step.zero_grad(set_to_none=True)
    loss, kd, weight = fn(case["student_hidden"], case["teacher_hidden"], case["labels"],
                          case["view_hidden"], case["negative_hidden"], cfg)
    (2.0 * loss).backward()
    return [loss, kd, weight] + [p.grad.clone() for p in step.parameters()]


@pytest.mark.parametrize("preset", ["sd", "unisd_star"])
def test_compiled_step_is_one_graph_with_the_op(preset):
    H, V = 16, 1001
    case = make_case(H=H, V=V, bias=False)
    cfg = usd.UniSDConfig.preset(preset)
    step = Step(H, V)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    expected = _run(step, step, case, cfg)
    got = _run(step, torch.compile(step, backend=backend, fullgraph=True), case, cfg)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.unisd_fast.linear_loss.default in targets
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager():
    H, V = 16, 1001
    case = make_case(H=H, V=V, bias=False)
    cfg = usd.UniSDConfig.preset("unisd_star")
    step = Step(H, V)
    expected = _run(step, step, case, cfg)
    got = _run(step, torch.compile(step, fullgraph=True), case, cfg)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
