"""`RankCallback`: a RankController driven by `transformers.Trainer`.

The class subclasses transformers.TrainerCallback, so it is built on first use: importing
unsloth_compile.rank does not import transformers.
"""

from __future__ import annotations

from typing import Any, Optional

from .controller import RankController


def make_rank_callback() -> type:
    from transformers import TrainerCallback

    class RankCallback(TrainerCallback):
        """Drives a RankController inside `transformers.Trainer`.

        RankCallback(controller) or RankCallback(policy=..., **RankController kwargs), in which
        case the controller is built at train start on the Trainer's model, optimizer and LR
        scheduler. The loss it sees is the one Trainer logs (`logging_steps`; the mean over the
        steps since the last log), recorded in on_log; gradients are scored in on_optimizer_step
        (before zero_grad); the step count advances (and ranks change) in on_step_begin, i.e.
        between two optimizer steps and after the previous step's log.
        """

        def __init__(self, controller: Optional[RankController] = None, **controller_kwargs: Any):
            self.controller, self.controller_kwargs = controller, controller_kwargs
            self._advanced_to = 0

        def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
            if self.controller is None:
                self.controller = RankController(model, optimizer, scheduler=lr_scheduler, **self.controller_kwargs)
            else:
                self.controller.attach(optimizer, lr_scheduler)
            self._advanced_to = state.global_step

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.controller.observe_gradients()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.controller.record_loss(logs["loss"])

        def on_step_begin(self, args, state, control, **kwargs):
            while self._advanced_to < state.global_step:
                self._advanced_to += 1
                self.controller.advance()

    return RankCallback


def __getattr__(name: str) -> Any:
    # RankCallback subclasses transformers.TrainerCallback: built on first use so that importing
    # this module does not import transformers
    if name == "RankCallback":
        cls = make_rank_callback()
        globals()["RankCallback"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
