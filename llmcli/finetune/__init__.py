"""Fine-tuning methods: full, LoRA, adapters and prompt tuning, for language modelling, instructions and
classification. The `llmcli finetune` run that trains them is llmcli.training.finetune.

    lora.py, adapters.py, prompt.py   the methods, attached to a built model without changing its classes
    heads.py, tasks.py                the class head, and the data of the three tasks
    methods.py                        settings, and `attach`: base model -> model to train
    saving.py                         adapter/ on disk, `load_finetuned`, `merge`
    peft_export.py                    LoRA in the peft library's format
"""

from llmcli.finetune.methods import FinetuneSpec
from llmcli.finetune.saving import load_finetuned, merge

__all__ = ["FinetuneSpec", "load_finetuned", "merge"]
