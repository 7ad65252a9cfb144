"""The public trainers: TRL's trainers with `MultiConfigMixin` in front.

`RFSFTTrainer` takes everything `trl.SFTTrainer` takes, plus `configs` (the runs to compare), `num_chunks` and
`offload_optimizer`. With no `configs` and no engine option, each is exactly its TRL parent (`dropin.py`).

One module per TRL trainer (`sft.py`, `dpo.py`, `grpo.py`) over a shared `builder.py`.
"""

from ..rf_args import options_doc
from .dpo import RFDPOTrainer
from .grpo import RFGRPOTrainer
from .sft import RFSFTTrainer

# The options' documentation has one source, `RFArgs`'s field help, shown by `help()` on every trainer.
for _trainer in (RFSFTTrainer, RFDPOTrainer, RFGRPOTrainer):
    _trainer.__doc__ = f"{_trainer.__doc__.rstrip()}\n\n    Engine options ([`RFArgs`]):\n{options_doc()}\n"

__all__ = ["RFDPOTrainer", "RFGRPOTrainer", "RFSFTTrainer"]
