"""One tqdm progress bar over every run's optimizer steps, showing which run and chunk is training."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import TrainerCallback


class RunsProgressCallback(TrainerCallback):
    """Replaces `transformers.ProgressCallback`, whose bar assumes one run per `train()` call.

    Args:
        coordinator ([`Coordinator`]): Gives the total step count over all runs.
        active_run (`Callable[[], Run | None]`): Returns the run that is training.
    """

    def __init__(self, coordinator, active_run):
        self.coordinator = coordinator
        self.active_run = active_run
        self.bar = None

    def open(self, disable: bool) -> None:
        done = sum(run.global_step for run in self.coordinator)
        self.bar = tqdm(total=self.coordinator.total_steps(), initial=done, disable=disable, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        run = self.active_run()
        self.bar.total = self.coordinator.total_steps()
        self.bar.update(1)
        if run is not None:
            chunks = run.plan.num_chunks
            self.bar.set_postfix_str(
                f"run={run.name} chunk={run.current_chunk + 1}/{chunks} epoch={run.current_epoch + 1}", refresh=False
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
