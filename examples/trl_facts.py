"""UniSD* inside TRL on the built-in facts task (docs/trl.md).

Every UniSDSDFTConfig field (TRL's SDFT and TrainingArguments fields, and the ``unisd_*``
loss fields) is a command-line flag. Without ``--model_name_or_path`` it trains a randomly
initialised tiny model on CPU in about a minute (the mechanics, not a result):

    PYTHONPATH=. python examples/trl_facts.py --max_steps 10

On GPUs with a real model and vLLM generation (one process per GPU):

    accelerate launch examples/trl_facts.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --bf16 --use_vllm --vllm_mode colocate --vllm_gpu_memory_utilization 0.3 \\
        --per_device_train_batch_size 16 --num_generations 4 --max_completion_length 8 \\
        --learning_rate 2e-5 --max_steps 200 --output_dir runs/trl_facts_qwen

``--dataset FILE.jsonl`` trains on your own rows (``prompt``, ``privileged_context`` and,
for the contrastive term, ``negative_context``) instead of the facts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# facts_dataset.py sits beside this script, whose folder Python puts on the path
from facts_dataset import (  # noqa: E402
    TEACHER_PROMPT_TEMPLATE,
    facts_dataset,
    save_tiny_model,
    tiny_tokenizer,
)
from transformers import AutoTokenizer, HfArgumentParser  # noqa: E402

from unisd_fast.integrations.trl import UniSDSDFTConfig, UniSDSDFTTrainer  # noqa: E402

# The CPU demo; every value can be overridden on the command line. EMA teacher of UniSD*:
# beta 0.98 every 10 steps.
DEMO_DEFAULTS = {
    "output_dir": "runs/trl_facts",
    "max_steps": 20,
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 3,
    "learning_rate": 2e-3,
    "logging_steps": 5,
    "save_steps": 10,
    "report_to": "none",
    "bf16": False,
    "temperature": 0.7,
    "teacher_prompt_template": TEACHER_PROMPT_TEMPLATE,
    "teacher_model_kind": "ema",
    "teacher_update_rate": 0.02,
    "teacher_sync_steps": 10,
    "unisd_preset": "unisd_star",
}


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A model to train; None builds the tiny CPU model."}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "A JSONL file of rows; None uses the facts task."}
    )
    facts_seed: int = field(default=0, metadata={"help": "Seed of the facts task."})
    tiny_hidden_size: int = field(default=64, metadata={"help": "Hidden size of the tiny model."})


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, UniSDSDFTConfig))
    parser.set_defaults(**DEMO_DEFAULTS)
    script, args = parser.parse_args_into_dataclasses(args=argv)
    if script.model_name_or_path is None:
        model = save_tiny_model(
            os.path.join(args.output_dir, "tiny_base"), hidden_size=script.tiny_hidden_size
        )
        tokenizer = tiny_tokenizer(model)
    else:
        model = script.model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    if script.dataset is None:
        data = facts_dataset(script.facts_seed)
    else:
        from datasets import load_dataset

        data = load_dataset("json", data_files=script.dataset, split="train")
    trainer = UniSDSDFTTrainer(model, args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "final"))


if __name__ == "__main__":
    main()
