"""EMA teacher (full fine-tuning and LoRA), frozen scorers and completion scoring."""

import copy

import pytest
import torch

from unisd_fast.train.models.tiny import build_tiny_model, build_tokenizer
from unisd_fast.train.teachers import EMATeacher, Scorer, completion_forward, effective_weights

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def lora_student(model, r=4, alpha=8.0):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "up_proj"])
    student = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return student


def test_completion_forward_matches_unpadded_forward(tokenizer):
    model = build_tiny_model(tokenizer, seed=1).eval()
    prompts = [tokenizer("Q: 1+2=?\nA: ")["input_ids"], tokenizer("hi")["input_ids"]]
    completion = torch.tensor([[20, 21, 2, 0], [22, 23, 24, 25]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    with torch.no_grad():
        logits, hidden = completion_forward(
            model, prompts, completion, mask, tokenizer.pad_token_id
        )
        for b, p in enumerate(prompts):
            n = int(mask[b].sum())
            ids = torch.tensor([p + completion[b, :n].tolist()])
            out = model(ids, output_hidden_states=True)
            expect = out.logits[0, len(p) - 1 : len(p) - 1 + n]
            torch.testing.assert_close(logits[b, :n], expect, atol=1e-5, rtol=1e-4)
            expect_h = out.hidden_states[-1][0, len(p) - 1 : len(p) - 1 + n]
            torch.testing.assert_close(hidden[b, :n], expect_h, atol=1e-5, rtol=1e-4)
    assert logits.shape == (2, 4, len(tokenizer))


def test_completion_forward_repeats_completion_for_views(tokenizer):
    model = build_tiny_model(tokenizer, seed=1).eval()
    prompts = [[5, 6], [7], [8, 9, 10], [11]]
    completion = torch.tensor([[20, 21], [22, 23]])
    mask = torch.ones_like(completion, dtype=torch.bool)
    with torch.no_grad():
        views, _ = completion_forward(model, prompts, completion, mask, tokenizer.pad_token_id)
        third, _ = completion_forward(model, [prompts[2]], completion[:1], mask[:1], 0)
    torch.testing.assert_close(views[2], third[0], atol=1e-5, rtol=1e-4)


def test_effective_weights_under_lora_are_merged_weights(tokenizer):
    student = lora_student(build_tiny_model(tokenizer, seed=2))
    weights = {k: v.detach().clone() for k, v in effective_weights(student).items()}
    merged = student.merge_and_unload()
    expected = dict(merged.named_parameters())
    assert set(weights) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value.detach(), atol=1e-6, rtol=1e-5)


def test_ema_closed_form_full_finetuning(tokenizer):
    student = build_tiny_model(tokenizer, seed=3)
    teacher = build_tiny_model(tokenizer, seed=4)
    start = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema = EMATeacher(teacher, beta=0.9, every=2)
    assert [ema.maybe_update(student, s) for s in range(1, 7)] == [False, True] * 3
    assert ema.num_updates == 3
    target = student.state_dict()
    for name, value in teacher.state_dict().items():
        expect = 0.9**3 * start[name] + (1 - 0.9**3) * target[name]
        torch.testing.assert_close(value, expect, atol=1e-6, rtol=1e-5)


def test_ema_teacher_moves_under_lora_and_matches_closed_form(tokenizer):
    base = build_tiny_model(tokenizer, seed=5)
    teacher = copy.deepcopy(base)
    start = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = lora_student(base)
    target = {k: v.detach().clone() for k, v in effective_weights(student).items()}
    ema = EMATeacher(teacher, beta=0.98, every=1, bucket_bytes=4096)
    for step in range(1, 6):
        ema.maybe_update(student, step)
    moved = teacher.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(moved, start["model.layers.0.self_attn.q_proj.weight"])
    for name, value in teacher.state_dict().items():
        expect = 0.98**5 * start[name] + (1 - 0.98**5) * target[name]
        torch.testing.assert_close(value, expect, atol=1e-6, rtol=1e-5)


def test_ema_tied_embeddings_updated_once(tokenizer):
    student = build_tiny_model(tokenizer, seed=6, tie_word_embeddings=True)
    teacher = build_tiny_model(tokenizer, seed=7, tie_word_embeddings=True)
    start = teacher.lm_head.weight.detach().clone()
    EMATeacher(teacher, beta=0.5, every=1).update(student)
    expect = 0.5 * start + 0.5 * student.lm_head.weight.detach()
    torch.testing.assert_close(teacher.lm_head.weight, expect)
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight


def test_ema_rejects_bad_settings(tokenizer):
    model = build_tiny_model(tokenizer)
    with pytest.raises(ValueError, match="ema_beta"):
        EMATeacher(model, beta=1.0, every=1)
    with pytest.raises(ValueError, match="ema_every"):
        EMATeacher(model, beta=0.9, every=0)


def test_scorer_disables_adapter_and_restores_mode(tokenizer):
    base = build_tiny_model(tokenizer, seed=8)
    plain = copy.deepcopy(base).eval()
    student = lora_student(base).train()
    ids = torch.tensor([[5, 6, 7]])
    with Scorer(student, disable_adapter=True).active() as model:
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)
        assert not torch.is_grad_enabled()
    assert student.training
    with torch.no_grad():
        assert not torch.allclose(student(ids).logits, plain(ids).logits)


def perturbed_bf16_pair(tokenizer):
    teacher = build_tiny_model(tokenizer, seed=9).to(torch.bfloat16)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1.01)
    return teacher, student


def test_bf16_ema_uses_fp32_master_so_small_updates_accumulate(tokenizer):
    teacher, student = perturbed_bf16_pair(tokenizer)
    start = {k: v.float().clone() for k, v in teacher.state_dict().items()}
    stalled = EMATeacher(copy.deepcopy(teacher), beta=0.98, every=1, fp32_master=False)
    ema = EMATeacher(teacher, beta=0.98, every=1)
    assert ema.master is not None
    for _ in range(100):
        ema.update(student)
        stalled.update(student)
    w = 1 - 0.98**100
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(stalled.model.state_dict()[name].float(), start[name])
    for key, value in teacher.state_dict().items():
        expect = (1 - w) * start[key] + w * student.state_dict()[key].float()
        torch.testing.assert_close(value, expect.to(torch.bfloat16), atol=1e-2, rtol=1e-2)
    assert not torch.equal(teacher.state_dict()[name].float(), start[name])


def test_ema_state_roundtrip_keeps_the_master(tokenizer):
    teacher, student = perturbed_bf16_pair(tokenizer)
    ema = EMATeacher(teacher, beta=0.9, every=1)
    ema.update(student)
    state = copy.deepcopy(ema.state_dict())
    restored = EMATeacher(build_tiny_model(tokenizer, seed=10).to(torch.bfloat16), 0.9, 1)
    restored.load_state_dict(state)
    ema.update(student)
    restored.update(student)
    assert restored.num_updates == 2
    for key, value in ema.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[key], value)
