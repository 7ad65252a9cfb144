"""`RFArgs`: the one list of engine options every RF trainer takes, validated with messages naming the option."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from rf_callbacks import RFDPOTrainer, RFGRPOTrainer, RFSFTTrainer
from rf_callbacks.rf_args import RF_OPTIONS, RFArgs, RFOptions


@pytest.mark.parametrize("trainer", [RFSFTTrainer, RFDPOTrainer, RFGRPOTrainer])
def test_every_trainer_takes_the_same_options_with_the_same_defaults(trainer):
    keyword_only = {
        name: parameter.default
        for name, parameter in inspect.signature(trainer.__init__).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert keyword_only == {"configs": None, **RF_OPTIONS}
    for name in RF_OPTIONS:  # documented from the one source
        assert f"\n        {name} (`" in trainer.__doc__, name


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_chunks": 0}, "num_chunks=0 is invalid; it must be 'auto' or an int >= 1"),
        ({"num_chunks": "many"}, "num_chunks='many' is invalid"),
        ({"offload_optimizer": "yes"}, "offload_optimizer='yes' is invalid; use True, False or 'auto'"),
        ({"oom_retry": 1}, "oom_retry=1 is invalid; use True or False"),
        ({"fused": "true"}, "fused='true' is invalid; use True or False"),
        ({"checkpoint_every": 0}, "checkpoint_every must be an int >= 1 or None, got 0"),
        ({"checkpoint_every": True}, "checkpoint_every must be an int >= 1 or None, got True"),
        ({"max_fused": 0}, "max_fused=0 is invalid; use an int >= 1 or 'auto'"),
        ({"parallel": "model"}, "parallel='model' is invalid; use 'auto', 'configs' or 'data'"),
        ({"dashboard": True, "control_socket": False}, "dashboard=True needs control_socket=True"),
    ],
)
def test_bad_values_are_refused_naming_the_option(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RFArgs(**values)


def test_defaults():
    assert RFArgs() == RFArgs(**RF_OPTIONS)
    assert RFArgs(num_chunks=8, checkpoint_every=2).num_chunks == 8


def test_the_typed_keywords_are_the_fields():
    """`RFOptions` (what type checkers see for `**options`) names every `RFArgs` field with the same type."""
    fields = {option.name: str(option.type) for option in dataclasses.fields(RFArgs)}
    assert {name: hint.__forward_arg__ for name, hint in RFOptions.__annotations__.items()} == fields


@pytest.mark.parametrize("trainer", [RFSFTTrainer, RFDPOTrainer, RFGRPOTrainer])
def test_an_unknown_option_is_refused_as_python_refuses_it(trainer, tmp_path):
    with pytest.raises(TypeError, match="got an unexpected keyword argument 'num_chunk'"):
        trainer(model="m", train_dataset=None, configs=[{}], num_chunk=4)
