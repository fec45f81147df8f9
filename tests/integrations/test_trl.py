"""UniSD inside TRL (docs/trl.md): parity with SDFTTrainer's full-logits loss, UniSD* end to
end, checkpoint resume, config mapping, and the lazy import."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.sdft import SDFTConfig, SDFTTrainer  # noqa: E402

from examples.facts_dataset import (  # noqa: E402
    TEACHER_PROMPT_TEMPLATE,
    facts_dataset,
    save_tiny_model,
    tiny_tokenizer,
)
from unisd_fast import UniSDConfig, unisd_loss  # noqa: E402
from unisd_fast.integrations.trl import (  # noqa: E402
    UniSDSDFTConfig,
    UniSDSDFTTrainer,
    divergence_of_alpha,
)
from unisd_fast.integrations.trl_batch import step_token_counts  # noqa: E402

COMMON = {
    "per_device_train_batch_size": 4,
    "num_generations": 2,
    "max_completion_length": 4,
    "max_prompt_length": 32,
    "teacher_prompt_template": TEACHER_PROMPT_TEMPLATE,
    "report_to": "none",
    "logging_steps": 1,
    "save_strategy": "no",
    "use_cpu": True,
    "bf16": False,
    "seed": 0,
    "learning_rate": 1e-2,
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "base", hidden_size=32, num_layers=1)


@pytest.fixture(scope="module")
def data():
    return facts_dataset(seed=3, num_facts=8)


def model_of(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def perturb(model):
    """A student away from its base teacher: divergences far from 0."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))


def loss_and_grads(trainer, model, batch):
    trainer.current_gradient_accumulation_steps = 2
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), grads(model)


def assert_same(a, b):
    (loss_a, grad_a), (loss_b, grad_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    assert grad_a.keys() == grad_b.keys() and grad_a
    for name in grad_a:
        torch.testing.assert_close(
            grad_a[name], grad_b[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize(
    ("alpha", "temperature", "path"),
    [(0.0, 0.7, "linear"), (0.5, 1.0, "logits"), (0.3, 0.7, "linear"), (1.0, 1.3, "logits")],
)
def test_loss_and_gradients_equal_sdft_full_logits(base, data, tmp_path, alpha, temperature, path):
    options = dict(
        COMMON,
        output_dir=str(tmp_path),
        distillation_alpha=alpha,
        temperature=temperature,
        teacher_model_kind="base",
        num_loss_tokens_to_skip=1,
    )
    model, tokenizer = model_of(base), tiny_tokenizer(base)
    ours = UniSDSDFTTrainer(
        model,
        UniSDSDFTConfig(**options, unisd_loss_path=path, distillation_mode="full_logits"),
        train_dataset=data,
        processing_class=tokenizer,
    )
    theirs = SDFTTrainer(
        model,
        SDFTConfig(**options, distillation_mode="full_logits", distillation_is_clip=None),
        train_dataset=data,
        processing_class=tokenizer,
    )
    cfg = ours.unisd_config
    assert cfg.divergence == divergence_of_alpha(alpha)["divergence"]
    assert cfg.temperature == temperature
    perturb(model)
    model.train()
    batch = ours._prepare_training_batch([data[i] for i in (0, 0, 1, 1)])
    assert batch["completion_mask"].sum() > 0
    expected = loss_and_grads(theirs, model, batch)
    assert expected[0] > 1e-2
    assert_same(loss_and_grads(ours, model, batch), expected)
    assert ours.unisd_path == path


def test_lora_student_with_base_teacher_equals_sdft(base, data, tmp_path):
    """PEFT: the base teacher is the student with its adapter disabled (TRL's teacher
    context); both trainers get identically initialised adapters (TRL seeds before PEFT)."""
    peft = pytest.importorskip("peft")
    options = dict(COMMON, output_dir=str(tmp_path), teacher_model_kind="base", temperature=0.7)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    tokenizer = tiny_tokenizer(base)
    ours = UniSDSDFTTrainer(
        model_of(base),
        UniSDSDFTConfig(**options, distillation_alpha=0.0, distillation_mode="full_logits"),
        train_dataset=data, processing_class=tokenizer, peft_config=lora,
    )
    theirs = SDFTTrainer(
        model_of(base),
        SDFTConfig(**options, distillation_alpha=0.0, distillation_mode="full_logits"),
        train_dataset=data, processing_class=tokenizer, peft_config=lora,
    )
    for trainer in (ours, theirs):  # move the adapters off zero, identically
        torch.manual_seed(1)
        perturb_lora(trainer.model)
        trainer.model.train()
    batch = ours._prepare_training_batch([data[i] for i in (2, 2, 5, 5)])
    expected = loss_and_grads(theirs, theirs.model, batch)
    assert expected[0] > 1e-3 and all("lora" in name for name in expected[1])
    assert_same(loss_and_grads(ours, ours.model, batch), expected)
    assert ours.unisd_path == "linear"


def test_bf16_mixed_precision_runs_the_head_in_bf16_on_the_linear_path(base, data, tmp_path):
    options = dict(COMMON, output_dir=str(tmp_path), bf16=True, teacher_model_kind="base")
    model, tokenizer = model_of(base), tiny_tokenizer(base)
    trainers = [
        UniSDSDFTTrainer(
            model,
            UniSDSDFTConfig(**options, unisd_loss_path=path),
            train_dataset=data,
            processing_class=tokenizer,
        )
        for path in ("auto", "logits")
    ]
    assert trainers[0].accelerator.mixed_precision == "bf16"
    perturb(model)
    model.train()
    batch = trainers[0]._prepare_training_batch([data[i] for i in (0, 0, 1, 1)])
    (linear, _), (logits, _) = (loss_and_grads(t, model, batch) for t in trainers)
    assert trainers[0].unisd_path == "linear"
    assert trainers[0]._head(model).weight.dtype == torch.bfloat16
    torch.testing.assert_close(linear, logits, rtol=2e-2, atol=1e-4)


def perturb_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn_like(p))


def test_linear_and_logits_paths_agree_with_every_mechanism_on(base, data, tmp_path):
    options = dict(
        COMMON,
        output_dir=str(tmp_path),
        unisd_preset="unisd_star",
        unisd_agreement_gamma=1.0,
        unisd_contrastive_weight=0.5,
        unisd_feature_weight=0.5,
        unisd_clip_quantile=0.8,
        unisd_num_views=3,
        temperature=0.8,
        teacher_model_kind="base",
    )
    model, tokenizer = model_of(base), tiny_tokenizer(base)
    trainers = [
        UniSDSDFTTrainer(
            model,
            UniSDSDFTConfig(**options, unisd_loss_path=path),
            train_dataset=data,
            processing_class=tokenizer,
        )
        for path in ("logits", "linear")
    ]
    perturb(model)
    model.train()
    batch = trainers[0]._prepare_training_batch([data[i] for i in (0, 0, 1, 1)])
    assert batch["unisd_view_input_ids"].shape[:2] == (4, 3)
    logits, linear = (loss_and_grads(t, model, batch) for t in trainers)
    assert_same(linear, logits)
    assert [t.unisd_path for t in trainers] == ["logits", "linear"]


def test_unisd_star_trains_and_resumes_from_checkpoint(base, data, tmp_path):
    options = dict(
        COMMON,
        output_dir=str(tmp_path),
        unisd_preset="unisd_star",
        unisd_temperature=0.7,
        unisd_num_views=2,
        unisd_normalize="token",
        unisd_clip_quantile=0.9,
        teacher_model_kind="ema",
        teacher_update_rate=0.1,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=1,
    )
    args = UniSDSDFTConfig(**options, max_steps=2)
    cfg = args.unisd_loss_config()
    assert cfg.needs_views and cfg.needs_negative and cfg.needs_hidden
    assert (cfg.divergence, cfg.normalize, cfg.clip_quantile) == ("fkl", "token", 0.9)
    tokenizer = tiny_tokenizer(base)
    trainer = UniSDSDFTTrainer(base, args, train_dataset=data, processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.unisd_path == "linear"
    logs = [entry for entry in trainer.state.log_history if "unisd/feature" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["unisd/feature"] > 0 and 0 < entry["unisd/agreement_weight"] <= 1
        assert torch.isfinite(torch.tensor(entry["loss"]))
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved

    checkpoint = Path(tmp_path) / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    saved = torch.load(checkpoint / "training_args.bin", weights_only=False)
    assert isinstance(saved, UniSDSDFTConfig) and saved.unisd_preset == "unisd_star"
    resumed = UniSDSDFTTrainer(
        base,
        UniSDSDFTConfig(**options, max_steps=3),
        train_dataset=data,
        processing_class=tokenizer,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    state = json.loads((Path(tmp_path) / "checkpoint-3" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "unisd/kd" in e] == [1, 2, 3]


def test_step_token_counts_group_slices_into_optimizer_steps():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 0]])
    twice = lambda t: torch.cat([t, t])  # two processes with the same batch
    counts = step_token_counts(mask, steps_per_generation=3, accumulation_steps=1, gather=twice)
    assert counts.tolist() == [6, 6, 6, 6, 6, 6]
    counts = step_token_counts(mask, steps_per_generation=6, accumulation_steps=2, gather=twice)
    assert counts.tolist() == [6, 6, 6, 6, 6, 6]
    counts = step_token_counts(mask, steps_per_generation=6, accumulation_steps=3, gather=twice)
    assert counts.tolist() == [12, 12, 12, 6, 6, 6]
    with pytest.raises(ValueError, match="cannot split"):
        step_token_counts(mask, steps_per_generation=4, accumulation_steps=1, gather=twice)


def test_token_normalised_micro_steps_sum_to_the_whole_step_loss():
    """Dividing each micro-batch by the step's token count makes the accumulated loss the
    token mean over the step, which is what the per-row counts are for."""
    cfg = UniSDConfig(normalize="token", temperature=0.7)
    z, u = torch.randn(4, 5, 11), torch.randn(4, 5, 11)
    labels = torch.randint(0, 11, (4, 5))
    labels[1, 2:] = labels[3, :] = -100
    count = step_token_counts(labels.ne(-100), 2, 2, gather=lambda t: t)[0]
    parts = [unisd_loss(z[i : i + 2], u[i : i + 2], labels[i : i + 2], config=cfg,
                        num_items_in_batch=count).loss for i in (0, 2)]
    whole = unisd_loss(z, u, labels, config=cfg).loss
    torch.testing.assert_close(parts[0] + parts[1], whole)


def test_config_maps_trl_names_and_rejects_what_it_cannot_honour(tmp_path):
    base = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True}
    assert divergence_of_alpha(0.0) == {"divergence": "fkl"}
    assert divergence_of_alpha(1.0) == {"divergence": "rkl"}
    assert divergence_of_alpha(0.25) == {"divergence": "jsd", "jsd_alpha": 0.25}
    args = UniSDSDFTConfig(**base, temperature=0.9, distillation_mode="full_logits")
    assert args.distillation_alpha == 0.5
    assert args.unisd_loss_config() == UniSDConfig(temperature=0.9, divergence="jsd")
    args = UniSDSDFTConfig(**base, unisd_preset="sd", distillation_add_tail=True)
    assert args.distillation_alpha == 0.0 and args.distillation_mode == "topk_logits"
    assert args.unisd_loss_config() == UniSDConfig(topk=100, tail_bucket=True, temperature=1.0)
    args = UniSDSDFTConfig(**base, unisd_preset="gkd", unisd_clip=3.0, unisd_kd_weight=0.5,
                           distillation_topk=7)
    assert args.unisd_loss_config() == UniSDConfig(
        divergence="jsd", jsd_alpha=0.5, temperature=1.0, clip=3.0, kd_weight=0.5, topk=7
    )
    with pytest.raises(ValueError, match="distillation_mode must be one of"):
        UniSDSDFTConfig(**base, distillation_mode="sampled_token", distillation_alpha=1.0)
    with pytest.raises(ValueError, match="distillation_topk must be an int >= 1"):
        UniSDSDFTConfig(**base, distillation_topk=None)
    with pytest.raises(ValueError, match="use_teacher_server needs distillation_mode"):
        UniSDSDFTConfig(**base, use_teacher_server=True, use_vllm=True, vllm_mode="server",
                        distillation_mode="full_logits")
    with pytest.raises(ValueError, match="unisd_num_views must be >= 2"):
        UniSDSDFTConfig(**base, unisd_agreement="token", unisd_num_views=1)
    with pytest.raises(ValueError, match="multiple of gradient_accumulation_steps"):
        UniSDSDFTConfig(
            **base, unisd_normalize="token", gradient_accumulation_steps=2, steps_per_generation=3,
            num_generations=3,
        )
    with pytest.raises(ValueError, match="clip_quantile must lie in"):
        UniSDSDFTConfig(**base, unisd_clip_quantile=1.5)
    with pytest.raises(ValueError, match="unisd_preset must be one of"):
        UniSDSDFTConfig(**base, unisd_preset="star")
    with pytest.raises(ValueError, match="unisd_loss_path"):
        UniSDSDFTConfig(**base, unisd_loss_path="fused")


def test_missing_negative_column_is_named(base, data, tmp_path):
    args = UniSDSDFTConfig(**COMMON, output_dir=str(tmp_path), unisd_contrastive_weight=0.1)
    with pytest.raises(ValueError, match="negative_context"):
        UniSDSDFTTrainer(
            base, args, train_dataset=data.remove_columns("negative_context"),
            processing_class=tiny_tokenizer(base),
        )


def test_importing_unisd_fast_does_not_import_trl():
    code = (
        "import sys, unisd_fast, unisd_fast.integrations; "
        "assert 'trl' not in sys.modules, 'trl imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_adaptive_agreement_scores_the_selected_rows_only(base, data, tmp_path):
    """unisd_agreement_coverage < 1: both loss paths give the loss of full-length views of
    every row under the view mask of the rows selected from the divergence."""
    from unisd_fast import select_view_rows

    options = dict(COMMON, output_dir=str(tmp_path), unisd_preset="unisd_star",
                   unisd_agreement_gamma=1.0, unisd_agreement_coverage=0.5,
                   unisd_num_views=3, teacher_model_kind="base")
    model, tokenizer = model_of(base), tiny_tokenizer(base)
    trainers = [UniSDSDFTTrainer(model, UniSDSDFTConfig(**options, unisd_loss_path=path),
                                 train_dataset=data, processing_class=tokenizer)
                for path in ("logits", "linear")]
    perturb(model)
    model.train()
    batch = trainers[0]._prepare_training_batch([data[i] for i in (0, 0, 1, 1)])
    logits, linear = (loss_and_grads(t, model, batch) for t in trainers)
    assert_same(linear, logits)

    t, cfg = trainers[0], trainers[0].unisd_config
    labels = batch["completion_ids"].masked_fill(t.loss_mask(batch["completion_mask"]) == 0,
                                                 -100)
    T, teacher = labels.size(1), t.teacher_model
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    z, h, _ = t._forward(model, ids, mask, T, True, True)
    with torch.no_grad(), t.teacher_context():
        u, uh, _ = t._forward(teacher, batch["teacher_input_ids"],
                              batch["teacher_attention_mask"], T, True, True)
        v_ids, v_mask = batch["unisd_view_input_ids"], batch["unisd_view_attention_mask"]
        views = torch.stack([t._forward(teacher, v_ids[:, k], v_mask[:, k], T, True, False)[0]
                             for k in range(3)])
        n = t._forward(teacher, batch["unisd_negative_input_ids"],
                       batch["unisd_negative_attention_mask"], T, True, False)[0]
    plain = unisd_loss(z.detach(), u, labels, config=cfg.replace(
        agreement="none", agreement_coverage=1.0, contrastive_weight=0.0, feature_weight=0.0))
    sel = select_view_rows(plain.token_divergence, labels != -100, 0.5, cfg.normalize)
    assert 0 < len(sel.rows) < 4
    out = unisd_loss(z, u, labels, view_logits=views, negative_logits=n, student_hidden=h,
                     teacher_hidden=uh, config=cfg, view_mask=sel.view_mask)
    torch.testing.assert_close(logits[0], out.loss.detach() / 2, rtol=1e-5, atol=1e-7)
def assert_same_on_a_batch(model, ours, theirs, data, path):
    """Loss and gradients of both trainers on one rollout batch of a perturbed student."""
    perturb(model)
    model.train()
    batch = ours._prepare_training_batch([data[i] for i in (0, 0, 1, 1)])
    expected = loss_and_grads(theirs, model, batch)
    assert expected[0] > 1e-3
    assert_same(loss_and_grads(ours, model, batch), expected)
    assert ours.unisd_path == path


def trainer_pair(base, data, tmp_path, **options):
    """UniSDSDFTTrainer and SDFTTrainer on one model, with the same TRL options."""
    options = {**COMMON, "output_dir": str(tmp_path), "teacher_model_kind": "base", **options}
    model, tokenizer = model_of(base), tiny_tokenizer(base)
    ours = UniSDSDFTTrainer(model, UniSDSDFTConfig(**options), train_dataset=data,
                            processing_class=tokenizer)
    theirs = SDFTTrainer(model, SDFTConfig(**options), train_dataset=data,
                         processing_class=tokenizer)
    return model, ours, theirs


@pytest.mark.parametrize(
    ("alpha", "tail", "topk", "path"),
    [(0.5, False, 10, "linear"), (0.5, True, 10, "logits"), (0.0, True, 1, "linear"),
     (1.0, False, 37, "logits"), (0.3, True, 37, "linear")],
)
def test_topk_logits_equals_sdft(base, data, tmp_path, alpha, tail, topk, path):
    """TRL's default mode: the student's top-k, renormalised or with the tail bucket."""
    model, ours, theirs = trainer_pair(
        base, data, tmp_path, distillation_alpha=alpha, distillation_add_tail=tail,
        distillation_topk=topk, temperature=0.8, num_loss_tokens_to_skip=1)
    ours.args.unisd_loss_path = path
    assert ours.unisd_config.topk == topk and ours.unisd_config.tail_bucket == tail
    assert_same_on_a_batch(model, ours, theirs, data, path)


def serve_from_local_teacher(trainer, k):
    """The teacher server's answer computed from the local teacher: its top-k token ids and
    log-probs at the trainer's temperature, and the completion tokens' log-probs, padded as
    TRL pads them (-inf, ids 0) past each completion."""
    def answer(inputs, length):
        with torch.no_grad():
            logits = trainer._forward_logits(trainer.teacher_model, inputs["teacher_input_ids"],
                                             inputs["teacher_attention_mask"], length)
        lp = torch.log_softmax(logits.float(), dim=-1)
        top, ids = lp.topk(k, dim=-1)
        actual = lp.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
        pad = inputs["completion_mask"] == 0
        return {"actual_logprobs": actual.masked_fill(pad, float("-inf")),
                "topk_logprobs": top.masked_fill(pad.unsqueeze(-1), float("-inf")),
                "topk_token_ids": ids.masked_fill(pad.unsqueeze(-1), 0)}

    trainer.use_teacher_server = True
    trainer.args.use_teacher_server = True  # set after init: TRL's init would start vLLM
    if isinstance(trainer, UniSDSDFTTrainer):
        trainer.unisd_config = trainer.args.unisd_loss_config()
        assert trainer.unisd_config.topk is None
    trainer._last_loaded_step = trainer.state.global_step  # weights "synced"
    trainer._get_teacher_token_logprobs_from_server = answer


@pytest.mark.parametrize(("alpha", "tail", "path"),
                         [(0.5, False, "linear"), (0.0, True, "logits"), (1.0, True, "linear")])
def test_teacher_server_topk_equals_sdft(base, data, tmp_path, alpha, tail, path):
    """use_teacher_server=True: the teacher's top-k (here from the local model, as a server
    returns it) is the loss's given support, on both trainers."""
    model, ours, theirs = trainer_pair(
        base, data, tmp_path, distillation_alpha=alpha, distillation_add_tail=tail,
        distillation_topk=12, temperature=0.9, teacher_model_kind="live")
    ours.args.unisd_loss_path = path
    for trainer in (ours, theirs):
        serve_from_local_teacher(trainer, 12)
    assert_same_on_a_batch(model, ours, theirs, data, path)


@pytest.mark.parametrize("mode", ["topk_logits", "full_logits"])
def test_importance_sampling_clip_equals_sdft(base, data, tmp_path, mode):
    """num_iterations=2: TRL stores the rollout's log-probs and clips the importance ratio
    of the moved student at distillation_is_clip; both trainers apply it per token."""
    model, ours, theirs = trainer_pair(
        base, data, tmp_path, distillation_mode=mode, distillation_topk=9,
        distillation_is_clip=1.3, num_iterations=2, distillation_alpha=0.5)
    model.train()
    batch = ours._prepare_training_batch([data[i] for i in (0, 0, 1, 1)])
    assert "old_per_token_logps" in batch
    perturb(model)
    expected = loss_and_grads(theirs, model, batch)
    assert_same(loss_and_grads(ours, model, batch), expected)
    ours.args.distillation_is_clip = None
    unclipped = loss_and_grads(ours, model, batch)
    assert abs(unclipped[0] - expected[0]) > 1e-4


def test_trl_defaults_train(base, data, tmp_path):
    """UniSDSDFTConfig with every default of SDFTConfig (top-k 100 = this vocabulary, the
    importance clip, JSD 0.5) trains."""
    args = UniSDSDFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                           bf16=False, max_steps=2, per_device_train_batch_size=4,
                           num_generations=2, max_completion_length=4, num_iterations=2,
                           teacher_prompt_template=TEACHER_PROMPT_TEMPLATE)
    defaults = SDFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    for name in ("distillation_mode", "distillation_topk", "distillation_is_clip",
                 "distillation_add_tail", "distillation_alpha", "use_teacher_server"):
        assert getattr(args, name) == getattr(defaults, name), name
    trainer = UniSDSDFTTrainer(base, args, train_dataset=data,
                               processing_class=tiny_tokenizer(base))
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history
               if "loss" in e)
