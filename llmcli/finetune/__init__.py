"""Fine-tuning: full, LoRA, adapters and prompt tuning, for language modelling, instructions and classification.

    lora.py, adapters.py, prompt.py   the methods, attached to a built model without changing its classes
    heads.py, tasks.py                the class head, and the data of the three tasks
    methods.py                        settings, and `attach`: base model -> model to train
    saving.py                         adapter/ on disk, `load_finetuned`, `merge`
    peft_export.py                    LoRA in the peft library's format
    run.py                            `finetune`: the shared training loop with all of the above
"""

from llmcli.finetune.methods import FinetuneSpec
from llmcli.finetune.run import finetune
from llmcli.finetune.saving import load_finetuned, merge

__all__ = ["FinetuneSpec", "finetune", "load_finetuned", "merge"]
