"""Unreliable-teacher variants of the facts task and the ablation harness."""

import csv
import statistics

import pytest

from experiments import ablation
from experiments.tasks.unreliable import Unreliability, is_wrong, unreliable_task
from unisd_fast.train.tasks import facts


def test_all_knobs_off_is_the_facts_task():
    clean, plain = unreliable_task(3), facts.facts_task(3)
    assert not clean.wrong_prompts
    assert clean.retention_prompts == plain.retention_prompts
    for a, b in zip(clean.train, plain.train, strict=True):
        assert (a.prompt, a.demonstration, a.negative) == (b.prompt, b.demonstration, b.negative)
        assert a.target == b.demonstration
        assert clean.templates.teacher_text(a.prompt, a.demonstration) == (
            plain.templates.teacher_text(b.prompt, b.demonstration)
        )
        refs = [("paz=", "12")]
        view = clean.templates.view_text(a.prompt, refs)
        assert view == plain.templates.view_text(b.prompt, refs)


def test_wrong_references_are_fixed_per_fact_and_keep_the_truth():
    task = unreliable_task(5, wrong_frac=0.25)
    assert task.train == unreliable_task(5, wrong_frac=0.25).train
    truth = {ex.prompt: ex.demonstration for ex in facts.facts_task(5).train}
    assert len(task.wrong_prompts) == 16
    for ex in task.train:
        assert ex.target == truth[ex.prompt]
        assert ex.negative not in (ex.demonstration, ex.target)
        wrong = is_wrong(task, ex)
        assert (ex.demonstration != ex.target) == wrong
        teacher = task.templates.teacher_text(ex.prompt, ex.demonstration)
        assert teacher == f"#{ex.prompt}{ex.demonstration}\n{ex.prompt}"
    assert len(unreliable_task(5, wrong_frac=1.0).wrong_prompts) == facts.NUM_FACTS


def test_noisy_views_read_the_own_reference_and_disagree():
    exact = unreliable_task(1, view_noise=0.0)
    ex = exact.train[0]
    others = [(o.prompt, o.demonstration) for o in exact.train[1:]]
    for ref in others[:5]:
        view = exact.templates.view_text(ex.prompt, [ref])
        assert view == f"#{ex.prompt}{ex.target}\n{ex.prompt}"
    always = unreliable_task(1, view_noise=1.0)
    codes = [always.templates.view_code(ex.prompt, p) for p, _ in others]
    assert ex.target not in codes
    half = unreliable_task(1, view_noise=0.5)
    codes = [half.templates.view_code(ex.prompt, p) for p, _ in others]
    assert 10 < codes.count(ex.target) < 53
    assert codes == [half.templates.view_code(ex.prompt, p) for p, _ in others]


def test_distractor_lines_surround_the_own_reference():
    task = unreliable_task(2, distractors=2)
    pairs = {f"{ex.prompt}{ex.demonstration}" for ex in task.train}
    positions = set()
    for ex in task.train:
        *lines, prompt = task.templates.teacher_text(ex.prompt, ex.demonstration).split("\n")
        assert prompt == ex.prompt and len(lines) == 3
        own = f"#{ex.prompt}{ex.demonstration}"
        assert lines.count(own) == 1
        assert all(line[1:] in pairs for line in lines)
        positions.add(lines.index(own))
    assert positions == {0, 1, 2}


@pytest.mark.parametrize(
    "values", [{"wrong_frac": 1.5}, {"view_noise": -0.1}, {"distractors": -1}]
)
def test_bad_knobs_raise(values):
    with pytest.raises(ValueError, match=next(iter(values))):
        Unreliability(**values)
    with pytest.raises(ValueError, match="distractors"):
        unreliable_task(0, distractors=facts.NUM_FACTS)


def test_score_separates_right_and_wrong_contexts():
    task = unreliable_task(4, wrong_frac=0.5)
    answers = []
    for i, ex in enumerate(task.eval):
        if is_wrong(task, ex):
            answers.append(ex.demonstration if i % 2 else ex.target)
        else:
            answers.append(ex.target if i % 4 else "xx")
    got = ablation.score(task, answers)
    wrong = [i for i, ex in enumerate(task.eval) if is_wrong(task, ex)]
    right = [i for i in range(len(task.eval)) if i not in wrong]
    assert got["acc_wrong"] == sum(i % 2 == 0 for i in wrong) / len(wrong)
    assert got["copied"] == 1 - got["acc_wrong"]
    assert got["acc_right"] == sum(i % 4 != 0 for i in right) / len(right)
    correct = sum(i % 2 == 0 for i in wrong) + sum(i % 4 != 0 for i in right)
    assert got["accuracy"] == correct / len(task.eval)
    clean = ablation.score(unreliable_task(4), [ex.target for ex in task.eval])
    assert clean["acc_wrong"] is None and clean["copied"] is None


def test_parse_method_overrides():
    assert ablation.parse_method("sd") == ("sd", {})
    name, values = ablation.parse_method("agreement/agreement_gamma=1/num_views=4")
    assert name == "agreement" and values == {"agreement_gamma": 1.0, "num_views": 4}
    with pytest.raises(ValueError, match="not one of"):
        ablation.parse_method("nope")
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        ablation.parse_method("sd/unknown_field=1")


def _record(method, seed, acc, kl):
    return {"variant": "wrong", "mode": "full", "method": method, "seed": seed,
            "accuracy": acc, "acc_right": acc, "acc_wrong": None, "copied": None,
            "teacher_accuracy": 1.0, "kl_base": kl, "retention_ppl": 2.0, "wall_s": 3.0}


def test_tables_give_mean_spread_and_paired_effects():
    records = [_record("sd", s, a, 1.0) for s, a in enumerate((0.5, 0.6, 0.7))]
    records += [_record("clip", s, a, 0.5) for s, a in enumerate((0.6, 0.6, 0.9))]
    rows = ablation.table(records).splitlines()
    sd_row = next(r for r in rows if "| sd |" in r)
    assert f"60.0% ± {statistics.stdev([0.5, 0.6, 0.7]):.1%}" in sd_row
    effect = next(r for r in ablation.effects(records).splitlines() if "| clip |" in r)
    assert f"+10.0% ± {statistics.stdev([0.1, 0.0, 0.2]):.1%}" in effect
    assert "-0.500 ± 0.000" in effect


def test_harness_end_to_end_and_resume(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--output", str(out), "--work-dir", str(work), "--methods",
            "sd,agreement/agreement_gamma=1", "--variants", "wrong", "--modes", "full,lora",
            "--seeds", "0", "--steps", "1", "--batch-size", "4", "--pretrain-max-steps", "2",
            "--workers", "0"]
    assert ablation.main(argv) == 0
    with (out / "records.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["mode"], r["method"]) for r in rows) == [
        ("-", "base"), ("full", "agreement/agreement_gamma=1"), ("full", "sd"),
        ("lora", "agreement/agreement_gamma=1"), ("lora", "sd"),
    ]
    base = next(r for r in rows if r["method"] == "base")
    assert float(base["teacher_accuracy"]) <= 0.75 + 1e-9
    assert "| agreement/agreement_gamma=1 |" in (out / "effects.md").read_text()
    assert "wall time" in (out / "run.txt").read_text()
    assert ablation.main(argv) == 0
    with (out / "records.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_seed_table_spans_the_runs(tmp_path):
    import json

    for seed, acc in enumerate((0.9, 1.0)):
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        evals = [{"kind": "eval", "step": s, "accuracy": a, "teacher_accuracy": 1.0,
                  "kl_base": kl, "retention_ppl": 2.0} for s, a, kl in ((0, 0.0, 0.0),
                                                                       (9, acc, 0.5 + seed))]
        lines = [json.dumps(evals[0]), json.dumps({"kind": "train", "step": 1}),
                 json.dumps(evals[1])]
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    text = ablation.seed_table([str(tmp_path / "s0"), str(tmp_path / "s1")])
    row = next(r for r in text.splitlines() if r.startswith("| student"))
    assert f"| 0.0% ± 0.0% | 95.0% ± {statistics.stdev([0.9, 1.0]):.1%} | [90.0%, 100.0%] |" in row
    assert "[0.500, 1.500]" in text and "(2 seeds)" in text


def test_adaptive_agreement_experiment_end_to_end(tmp_path):
    from experiments import adaptive_agreement

    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--output", str(out), "--work-dir", str(work), "--modes", "lora", "--seeds", "0",
            "--steps", "1", "--batch-size", "4", "--pretrain-max-steps", "2", "--workers", "0",
            "--coverage", "0.5", "--compare-coverages", "0.5,0.9"]
    assert adaptive_agreement.main(argv) == 0
    with (out / "records.csv").open() as f:
        methods = sorted(r["method"] for r in csv.DictReader(f))
    assert methods == ["agreement/agreement_gamma=1",
                       "agreement/agreement_gamma=1/agreement_coverage=0.5", "base"]
    assert "| agreement/agreement_gamma=1/agreement_coverage=0.5 |" in \
        (out / "adaptive_effects.md").read_text()
    assert "| lora | 1 |" in (out / "views.md").read_text()
    rows = [r for r in (out / "same_batches.md").read_text().splitlines() if "| base |" in r
            or "| trained" in r]
    assert len(rows) == 4  # base and the trained LoRA student, two coverages each
