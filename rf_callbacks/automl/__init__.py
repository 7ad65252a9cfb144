"""RapidFire AI-compatible search API: configs with `List`/`Range` values, grid and random search.

```python
from rf_callbacks import Experiment
from rf_callbacks.automl import List, Range, RFGridSearch, RFLoraConfig, RFModelConfig, RFRandomSearch, RFSFTConfig
```

`space.py` holds `List`, `Range` and the expansion/sampling of nested values; `configs.py` the `RF*Config` classes
(PEFT's and TRL's configs that accept them) and `RFModelConfig`; `search.py` the two searches; `generation.py` the
evaluation-time generation metrics. `rf_callbacks.experiment.Experiment` runs a search through `RFSFTTrainer`.
"""

from .configs import RFDPOConfig, RFGRPOConfig, RFLoraConfig, RFModelConfig, RFSFTConfig
from .search import RFGridSearch, RFRandomSearch
from .space import List, Range

__all__ = [
    "List",
    "RFDPOConfig",
    "RFGRPOConfig",
    "RFGridSearch",
    "RFLoraConfig",
    "RFModelConfig",
    "RFRandomSearch",
    "RFSFTConfig",
    "Range",
]
