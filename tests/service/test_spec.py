from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.errors import Invalid
from service.spec import StudySpec, check_spec, load_spec_file, validation_messages

SpecData = Callable[..., dict[str, Any]]


def messages(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as err:
        StudySpec.model_validate(data)
    return validation_messages(err.value)


def invalid(data: dict[str, Any], roots: list[Path]) -> Invalid:
    spec = StudySpec.model_validate(data)
    with pytest.raises(Invalid) as err:
        check_spec(spec, roots)
    return err.value


# ---------------------------------------------------------------------------- schema


def test_unknown_top_level_field_is_rejected(minilm_spec_data: SpecData) -> None:
    [(field, reason)] = messages(minilm_spec_data(n_trials=5))
    assert field == "n_trials"
    assert reason.startswith("unknown field; expected one of: name, description")


def test_unknown_field_inside_a_dimension_names_the_dimension_path(minilm_spec_data: SpecData) -> None:
    data = minilm_spec_data()
    data["search_space"]["learning_rate"]["scale"] = "log"
    [(field, reason)] = messages(data)
    assert field == "search_space.learning_rate.scale"
    assert "expected one of: type, low, high, log, step" in reason


def test_wrong_type_gets_the_dotted_field_without_union_tags(minilm_spec_data: SpecData) -> None:
    data = minilm_spec_data()
    data["search_space"]["learning_rate"]["low"] = "tiny"
    [(field, reason)] = messages(data)
    assert field == "search_space.learning_rate.low"
    assert reason.startswith("Input should be a valid number")


def test_fractional_int_bound_is_rejected(minilm_spec_data: SpecData) -> None:
    data = minilm_spec_data()
    data["search_space"]["num_layers"]["high"] = 4.5
    assert messages(data)[0][0] == "search_space.num_layers.high"


def test_dimension_without_type(minilm_spec_data: SpecData) -> None:
    data = minilm_spec_data()
    del data["search_space"]["num_layers"]["type"]
    assert messages(data) == [("search_space.num_layers.type", "required: one of 'float', 'int', 'categorical'")]


def test_unknown_dimension_type(minilm_spec_data: SpecData) -> None:
    data = minilm_spec_data()
    data["search_space"]["num_layers"]["type"] = "range"
    [(field, reason)] = messages(data)
    assert field == "search_space.num_layers.type"
    assert reason == "'range' is not one of 'float', 'int', 'categorical'"


def test_unknown_model_kind(minilm_spec_data: SpecData) -> None:
    [(field, reason)] = messages(minilm_spec_data(model={"kind": "hub", "name": "bert"}))
    assert field == "model.kind"
    assert "'pretrained', 'named', 'builtin'" in reason


def test_unknown_field_in_a_model_ref(minilm_spec_data: SpecData) -> None:
    [(field, reason)] = messages(minilm_spec_data(model={"kind": "named", "name": "x", "revision": "main"}))
    assert field == "model.revision"
    assert "unknown field" in reason


def test_unknown_sampler(minilm_spec_data: SpecData) -> None:
    [(field, reason)] = messages(minilm_spec_data(sampler={"name": "bayes"}))
    assert field == "sampler.name"
    assert "'tpe'" in reason and "'nsga2'" in reason


def test_unknown_pruner(minilm_spec_data: SpecData) -> None:
    [(field, reason)] = messages(minilm_spec_data(pruner={"name": "early"}))
    assert field == "pruner.name"
    assert "'median'" in reason and "'successive_halving'" in reason


def test_asha_is_an_alias_of_successive_halving(minilm_spec_data: SpecData) -> None:
    assert StudySpec.model_validate(minilm_spec_data()).pruner.name == "successive_halving"


def test_empty_choices(minilm_spec_data: SpecData) -> None:
    data = minilm_spec_data()
    data["search_space"]["batch_size"]["choices"] = []
    [(field, reason)] = messages(data)
    assert field == "search_space.batch_size.choices"
    assert "at least 1 item" in reason


def test_non_scalar_choice(minilm_spec_data: SpecData) -> None:
    data = minilm_spec_data()
    data["search_space"]["batch_size"]["choices"] = [16, {"value": 32}]
    assert messages(data) == [("search_space.batch_size.choices.1", "must be a string, number, boolean or null")]


def test_non_scalar_sampler_option(minilm_spec_data: SpecData) -> None:
    [(field, reason)] = messages(minilm_spec_data(sampler={"name": "tpe", "options": {"gamma": {"fn": "x"}}}))
    assert field == "sampler.options.gamma"
    assert "must be a string, number, boolean or null" in reason


@pytest.mark.parametrize("n_trials", [0, -3])
def test_n_trials_must_be_positive(minilm_spec_data: SpecData, n_trials: int) -> None:
    [(field, reason)] = messages(minilm_spec_data(budget={"n_trials": n_trials}))
    assert field == "budget.n_trials"
    assert "greater than or equal to 1" in reason


def test_budget_needs_an_end(minilm_spec_data: SpecData) -> None:
    assert messages(minilm_spec_data(budget={"max_parallel": 2})) == [
        ("budget", "set n_trials, timeout_s or both, so that the study ends")
    ]
    spec = StudySpec.model_validate(minilm_spec_data(budget={"timeout_s": 3600}))
    assert spec.budget.n_trials is None and spec.budget.max_parallel == 1


def test_bad_timeout_and_parallelism(minilm_spec_data: SpecData) -> None:
    fields = {f for f, _ in messages(minilm_spec_data(budget={"n_trials": 5, "timeout_s": 0, "max_parallel": 0}))}
    assert fields == {"budget.timeout_s", "budget.max_parallel"}


@pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 101])
def test_bad_study_name(minilm_spec_data: SpecData, name: str) -> None:
    assert messages(minilm_spec_data(name=name))[0][0] == "name"


def test_objective_shorthand_and_default_direction(minilm_spec_data: SpecData) -> None:
    data = minilm_spec_data(objective={"metric": "loss"})
    del data["objectives"]
    spec = StudySpec.model_validate(data)
    assert [(o.metric, o.direction) for o in spec.objectives] == [("loss", "minimize")]
    assert messages(minilm_spec_data(objective={"metric": "loss"})) == [
        ("spec", "give either objective or objectives, not both")
    ]


def test_unknown_metric(minilm_spec_data: SpecData) -> None:
    [(field, reason)] = messages(minilm_spec_data(objectives=[{"metric": "bleu"}]))
    assert field == "objectives.0.metric"
    assert "'accuracy'" in reason


def test_warm_start_accepts_a_name_or_an_id(minilm_spec_data: SpecData) -> None:
    by_id = StudySpec.model_validate(minilm_spec_data(warm_start_from={"study": 3}))
    by_name = StudySpec.model_validate(minilm_spec_data(warm_start_from={"study": "old-run", "n_best": 2}))
    assert (by_id.warm_start_from.study, by_id.warm_start_from.n_best) == (3, 10)
    assert (by_name.warm_start_from.study, by_name.warm_start_from.n_best) == ("old-run", 2)
    assert {f for f, _ in messages(minilm_spec_data(warm_start_from={"study": [1]}))} == {"warm_start_from.study"}
    assert messages(minilm_spec_data(warm_start_from={"study": "x", "n_best": 0}))[0][0] == "warm_start_from.n_best"


def test_json_round_trip_is_lossless(minilm_spec_data: SpecData) -> None:
    data = minilm_spec_data(fixed={"dropout": 0.2, "optimizer": "sgd"})
    data["search_space"]["unfreeze_depth"] = {"type": "categorical", "choices": [0, 2, "all"]}
    spec = StudySpec.model_validate(data)
    again = StudySpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again == spec


def test_specs_are_frozen(minilm_spec_data: SpecData) -> None:
    spec = StudySpec.model_validate(minilm_spec_data())
    with pytest.raises(ValidationError):
        spec.name = "other"  # type: ignore[misc]


# ---------------------------------------------------------------------------- files


def test_load_yaml_reads_exponents_as_floats(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        """
name: yaml-spec
model: {kind: named, name: all-minilm-l6-v2}
dataset: {kind: named, name: tweets-sentiment}
objective: {metric: f1_macro}
search_space:
  learning_rate: {type: categorical, choices: [1e-5, 3e-5, 1.0e-4]}
budget: {n_trials: 3}
"""
    )
    spec = load_spec_file(path)
    assert spec.search_space["learning_rate"].choices == [1e-5, 3e-5, 1e-4]
    assert spec.objectives[0].direction == "maximize"


def test_load_json(tmp_path: Path, minilm_spec_data: SpecData) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(minilm_spec_data()))
    assert load_spec_file(path) == StudySpec.model_validate(minilm_spec_data())


def test_load_reports_schema_errors_as_validation_errors(tmp_path: Path, minilm_spec_data: SpecData) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(minilm_spec_data(sampler={"name": "bayes"})))
    with pytest.raises(ValidationError) as err:
        load_spec_file(path)
    assert validation_messages(err.value)[0][0] == "sampler.name"


@pytest.mark.parametrize(
    ("text", "reason"),
    [("name: [unclosed", "is not valid YAML or JSON"), ("- a\n- b\n", "must hold a mapping of spec fields, not list")],
)
def test_load_rejects_unparsable_files(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(Invalid) as err:
        load_spec_file(path)
    assert err.value.field == "spec" and reason in err.value.reason
    assert "\n" not in err.value.reason


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(Invalid, match="cannot read"):
        load_spec_file(tmp_path / "absent.yaml")


def test_yaml_tags_never_build_objects(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(Invalid, match="not valid YAML"):
        load_spec_file(path)


# ---------------------------------------------------------------------------- check_spec


def test_good_minilm_spec_passes(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    check_spec(StudySpec.model_validate(minilm_spec_data()), [spec_data_root])


def test_good_builtin_spec_passes(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        model={"kind": "builtin", "tokenizer": "all-minilm-l6-v2"},
        dataset={"kind": "files", "train": "train.csv"},
        search_space={
            "num_heads": {"type": "categorical", "choices": [2, 4, 8]},
            "hidden_size": {"type": "int", "low": 60, "high": 512},
            "num_layers": {"type": "int", "low": 1, "high": 8},
            "unfreeze_depth": {"type": "categorical", "choices": [0, 1, "all"]},
            "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
            "dropout": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
        },
        fixed={"ffn_size": 512, "class_balanced": True},
    )
    check_spec(StudySpec.model_validate(data), [spec_data_root])


def test_unknown_knob_lists_the_known_ones(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["lr"] = {"type": "float", "low": 0.1, "high": 0.2}
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.lr"
    assert err.reason.startswith("unknown knob 'lr'; known knobs: learning_rate, batch_size")
    err = invalid(minilm_spec_data(fixed={"warmup": 0.1}), [spec_data_root])
    assert err.field == "fixed.warmup" and "known knobs" in err.reason


def test_knob_both_searched_and_fixed(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    err = invalid(minilm_spec_data(fixed={"batch_size": 32}), [spec_data_root])
    assert (err.field, err.reason) == (
        "fixed.batch_size",
        "batch_size is also in search_space; a knob is either searched or fixed",
    )


def test_float_dimension_on_an_int_knob(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["batch_size"] = {"type": "float", "low": 8, "high": 64}
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.batch_size.type"
    assert "batch_size is an int knob" in err.reason and "use type int or categorical" in err.reason


def test_int_dimension_on_a_categorical_knob(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["class_balanced"] = {"type": "int", "low": 0, "high": 1}
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.class_balanced.type" and "use type categorical" in err.reason


def test_choice_outside_a_categorical_knob(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["optimizer"] = {"type": "categorical", "choices": ["adamw", "adagrad"]}
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.optimizer.choices.1"
    assert err.reason == "'adagrad' is not a valid optimizer: expected one of 'adamw', 'adam', 'sgd', 'rmsprop'"


def test_choice_outside_an_int_knobs_limits(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["batch_size"]["choices"] = [16, 8192]
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.batch_size.choices.1"
    assert "expected an integer in [1, 4096]" in err.reason


def test_duplicate_choices(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["batch_size"]["choices"] = [16, 32, 16.0]
    err = invalid(data, [spec_data_root])
    assert (err.field, err.reason) == ("search_space.batch_size.choices.2", "16.0 appears more than once")


@pytest.mark.parametrize(("low", "high"), [(1e-3, 1e-4), (1e-4, 1e-4)])
def test_low_must_be_below_high(minilm_spec_data: SpecData, spec_data_root: Path, low: float, high: float) -> None:
    data = minilm_spec_data()
    data["search_space"]["learning_rate"].update(low=low, high=high)
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.learning_rate.low"
    assert "must be below high" in err.reason and "put learning_rate in fixed" in err.reason


def test_range_outside_the_knob_limits(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["learning_rate"]["high"] = 2.0
    err = invalid(data, [spec_data_root])
    assert (err.field, err.reason) == (
        "search_space.learning_rate.high",
        "2 is outside the limits of learning_rate: a number in (0, 1]",
    )
    data = minilm_spec_data()
    data["search_space"]["learning_rate"] = {"type": "float", "low": 0.0, "high": 0.1}
    assert invalid(data, [spec_data_root]).field == "search_space.learning_rate.low"


def test_log_range_needs_a_positive_low(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["weight_decay"] = {"type": "float", "low": 0.0, "high": 0.1, "log": True}
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.weight_decay.low"
    assert "must be > 0 on a log scale" in err.reason


@pytest.mark.parametrize(
    "dim",
    [
        {"type": "float", "low": 1e-5, "high": 1e-3, "log": True, "step": 1e-5},
        {"type": "int", "low": 8, "high": 64, "log": True, "step": 8},
    ],
)
def test_log_with_step(minilm_spec_data: SpecData, spec_data_root: Path, dim: dict[str, Any]) -> None:
    data = minilm_spec_data()
    knob = "learning_rate" if dim["type"] == "float" else "batch_size"
    data["search_space"][knob] = dim
    err = invalid(data, [spec_data_root])
    assert err.field == f"search_space.{knob}.step"
    assert err.reason == "cannot be combined with log: true; drop step or log"


def test_step_larger_than_the_range(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["dropout"] = {"type": "float", "low": 0.0, "high": 0.2, "step": 0.5}
    assert invalid(data, [spec_data_root]).field == "search_space.dropout.step"


@pytest.mark.parametrize(
    ("fixed", "expected"),
    [
        ({"dropout": 0.95}, "0.95 is not a valid dropout: expected a number in [0, 0.9]"),
        ({"optimizer": "lion"}, "'lion' is not a valid optimizer"),
        ({"epochs": 2.5}, "2.5 is not a valid epochs: expected an integer in [1, 1000]"),
        ({"class_balanced": 1}, "1 is not a valid class_balanced: expected true or false"),
        ({"unfreeze_depth": "some"}, "expected an integer in [0, 128] or 'all'"),
    ],
)
def test_fixed_values_outside_limits(
    minilm_spec_data: SpecData, spec_data_root: Path, fixed: dict[str, Any], expected: str
) -> None:
    err = invalid(minilm_spec_data(search_space={}, fixed=fixed), [spec_data_root])
    assert err.field == f"fixed.{next(iter(fixed))}"
    assert expected in err.reason


def test_duplicate_objective_metric(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(objectives=[{"metric": "accuracy"}, {"metric": "accuracy", "direction": "minimize"}])
    data["pruner"] = {"name": "none"}
    err = invalid(data, [spec_data_root])
    assert err.field == "objectives.1.metric" and "already an objective" in err.reason


def test_unknown_model_and_dataset_names(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    err = invalid(minilm_spec_data(model={"kind": "named", "name": "gpt-5"}), [spec_data_root])
    assert err.field == "model.name"
    assert "unknown model name 'gpt-5'; known: all-minilm-l6-v2" in err.reason
    err = invalid(minilm_spec_data(dataset={"kind": "named", "name": "imdb"}), [spec_data_root])
    assert err.field == "dataset.name" and "known: tweets-sentiment" in err.reason


def test_dataset_path_outside_the_roots(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    err = invalid(minilm_spec_data(dataset={"kind": "files", "train": "../x.csv"}), [spec_data_root])
    assert err.field == "dataset.train" and "'../x.csv' is outside the data roots" in err.reason


def test_missing_dataset_file(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    err = invalid(minilm_spec_data(dataset={"kind": "files", "train": "missing.csv"}), [spec_data_root])
    assert err.field == "dataset.train" and "'missing.csv' does not exist" in err.reason


def test_pretrained_folder_without_config(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    (spec_data_root / "empty-model").mkdir()
    err = invalid(minilm_spec_data(model={"kind": "pretrained", "path": "empty-model"}), [spec_data_root])
    assert err.field == "model.path" and "no config.json" in err.reason


# ---------------------------------------------------------------------------- conditional knobs


def test_unfreeze_depth_above_num_layers_when_both_fixed(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(fixed={"num_layers": 3, "unfreeze_depth": 4})
    for knob in ("num_layers", "unfreeze_depth"):
        del data["search_space"][knob]
    err = invalid(data, [spec_data_root])
    assert (err.field, err.reason) == ("fixed.unfreeze_depth", "unfreeze_depth (4) cannot exceed num_layers (3)")


def test_unfreeze_depth_low_above_num_layers_high(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["num_layers"].update(low=1, high=3)
    data["search_space"]["unfreeze_depth"].update(low=4, high=6)
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.unfreeze_depth.low"
    assert "unfreeze_depth (4) exceeds every num_layers in [1, 3]" in err.reason


def test_fixed_unfreeze_depth_above_the_model_depth(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(search_space={}, fixed={"unfreeze_depth": 7})
    err = invalid(data, [spec_data_root])
    assert (err.field, err.reason) == (
        "fixed.unfreeze_depth",
        "unfreeze_depth (7) cannot exceed num_layers (6, the model's depth)",
    )


def test_categorical_unfreeze_choice_above_every_num_layers(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["unfreeze_depth"] = {"type": "categorical", "choices": [0, 8, "all"]}
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.unfreeze_depth"
    assert "unfreeze_depth (8) exceeds every num_layers in [2, 6]" in err.reason


def test_categorical_unfreeze_with_categorical_layers_must_fit_all(
    minilm_spec_data: SpecData, spec_data_root: Path
) -> None:
    data = minilm_spec_data()
    data["search_space"]["num_layers"] = {"type": "categorical", "choices": [2, 6]}
    data["search_space"]["unfreeze_depth"] = {"type": "categorical", "choices": [0, 4]}
    err = invalid(data, [spec_data_root])
    assert (err.field, err.reason) == (
        "search_space.unfreeze_depth.choices.1",
        "unfreeze_depth (4) cannot exceed num_layers (2)",
    )


def test_num_layers_above_a_pretrained_models_depth(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(model={"kind": "pretrained", "path": "tiny-bert"})
    data["search_space"]["num_layers"].update(low=1, high=6)
    data["search_space"]["unfreeze_depth"].update(high=1)
    err = invalid(data, [spec_data_root])
    assert (err.field, err.reason) == ("search_space.num_layers.high", "6 exceeds the model's 4 layers")
    data["search_space"]["num_layers"] = {"type": "categorical", "choices": [2, 5]}
    assert invalid(data, [spec_data_root]).field == "search_space.num_layers.choices.1"


def test_fixed_num_layers_and_heads_above_the_model(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(model={"kind": "pretrained", "path": "tiny-bert"}, search_space={}, fixed={"num_layers": 5})
    assert invalid(data, [spec_data_root]).field == "fixed.num_layers"
    data = minilm_spec_data(search_space={}, fixed={"num_heads": 16})
    err = invalid(data, [spec_data_root])
    assert (err.field, err.reason) == ("fixed.num_heads", "16 exceeds the model's 12 attention heads")


def test_builtin_num_heads_must_divide_fixed_hidden_size(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(model={"kind": "builtin"}, search_space={}, fixed={"hidden_size": 256, "num_heads": 3})
    err = invalid(data, [spec_data_root])
    assert (err.field, err.reason) == (
        "fixed.hidden_size",
        "hidden_size (256) must be divisible by num_heads (3) for the built-in model",
    )


def test_builtin_searched_heads_must_divide_default_hidden_size(
    minilm_spec_data: SpecData, spec_data_root: Path
) -> None:
    data = minilm_spec_data(model={"kind": "builtin"}, search_space={"num_heads": {"type": "int", "low": 1, "high": 8}})
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.num_heads"
    assert "hidden_size (256) must be divisible by num_heads (3)" in err.reason


def test_builtin_hidden_range_without_a_multiple_of_heads(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        model={"kind": "builtin"},
        search_space={"hidden_size": {"type": "int", "low": 65, "high": 90}},
        fixed={"num_heads": 32},
    )
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.hidden_size"
    assert "no multiple of 32 lies in [65, 90]" in err.reason


def test_builtin_hidden_choices_must_suit_every_heads(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        model={"kind": "builtin"},
        search_space={
            "num_heads": {"type": "categorical", "choices": [4, 6]},
            "hidden_size": {"type": "categorical", "choices": [96, 128]},
        },
    )
    err = invalid(data, [spec_data_root])
    assert (err.field, err.reason) == (
        "search_space.hidden_size.choices.1",
        "hidden_size (128) must be divisible by num_heads (6) for the built-in model",
    )


def test_builtin_log_hidden_size_with_heads(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        model={"kind": "builtin"},
        search_space={"hidden_size": {"type": "int", "low": 64, "high": 512, "log": True}},
        fixed={"num_heads": 4},
    )
    assert invalid(data, [spec_data_root]).field == "search_space.hidden_size.log"


@pytest.mark.parametrize(
    "model", [{"kind": "named", "name": "all-minilm-l6-v2"}, {"kind": "builtin", "checkpoint": "tiny-bert"}]
)
def test_width_knobs_only_for_a_builtin_model_from_scratch(
    minilm_spec_data: SpecData, spec_data_root: Path, model: dict[str, Any]
) -> None:
    data = minilm_spec_data(model=model, search_space={}, fixed={"ffn_size": 512})
    err = invalid(data, [spec_data_root])
    assert err.field == "fixed.ffn_size" and "only applies to a built-in model built from scratch" in err.reason


# ---------------------------------------------------------------------------- sampler, pruner, objectives


def test_grid_needs_a_finite_space(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(sampler={"name": "grid"})
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.learning_rate"
    assert "the grid sampler needs a finite space" in err.reason


def test_grid_size_is_capped(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        sampler={"name": "grid"},
        search_space={
            "batch_size": {"type": "int", "low": 1, "high": 4096},
            "epochs": {"type": "int", "low": 1, "high": 100},
        },
    )
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space"
    assert "the grid has 409,600 points, more than the limit of 100,000" in err.reason


def test_grid_with_an_invalid_combination(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(sampler={"name": "grid"})
    del data["search_space"]["learning_rate"]
    err = invalid(data, [spec_data_root])
    assert err.field == "search_space.unfreeze_depth"
    assert "runs every combination, and unfreeze_depth=3 with num_layers=2 is invalid" in err.reason


def test_two_objectives_with_cmaes(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        objectives=[{"metric": "accuracy"}, {"metric": "loss"}], sampler={"name": "cmaes"}, pruner={"name": "none"}
    )
    err = invalid(data, [spec_data_root])
    assert err.field == "sampler.name"
    assert err.reason.startswith("cmaes optimises a single objective; with 2 objectives use one of tpe, nsga2")


def test_two_objectives_with_a_pruner(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(objectives=[{"metric": "accuracy"}, {"metric": "loss"}], sampler={"name": "nsga2"})
    err = invalid(data, [spec_data_root])
    assert err.field == "pruner.name" and "cannot prune a study with several objectives" in err.reason
    data["pruner"] = {"name": "none"}
    check_spec(StudySpec.model_validate(data), [spec_data_root])


@pytest.mark.parametrize(
    ("section", "options", "field", "reason"),
    [
        ("sampler", {"n_startup": 5}, "sampler.options.n_startup", "unknown option of TPESampler; accepted options:"),
        ("sampler", {"gamma": 3}, "sampler.options.gamma", "TPESampler's gamma cannot be set from a spec; accepted"),
        ("sampler", {"consider_prior": True}, "sampler.options.consider_prior", "cannot be set from a spec"),
        ("sampler", {"n_startup_trials": "ten"}, "sampler.options.n_startup_trials", "expected an integer in [0, "),
        ("sampler", {"n_startup_trials": True}, "sampler.options.n_startup_trials", "got True"),
        ("sampler", {"n_startup_trials": 10**6}, "sampler.options.n_startup_trials", "in [0, 10000], got 1000000"),
        ("sampler", {"n_ei_candidates": 3_000_000}, "sampler.options.n_ei_candidates", "in [1, 1000]"),
        ("sampler", {"n_ei_candidates": 0}, "sampler.options.n_ei_candidates", "in [1, 1000]"),
        ("sampler", {"seed": 3}, "sampler.options.seed", "set sampler.seed instead"),
        ("pruner", {"warmup": 2}, "pruner.options.warmup", "unknown option of SuccessiveHalvingPruner"),
        ("pruner", {"min_resource": "soon"}, "pruner.options.min_resource", "or 'auto', got 'soon'"),
        ("pruner", {"min_resource": 0}, "pruner.options.min_resource", "in [1, 100000000]"),
        ("pruner", {"reduction_factor": 1}, "pruner.options.reduction_factor", "in [2, 100]"),
        ("pruner", {"reduction_factor": 10**6}, "pruner.options.reduction_factor", "in [2, 100]"),
        ("pruner", {"min_early_stopping_rate": 10**9}, "pruner.options.min_early_stopping_rate", "in [0, 30]"),
        ("pruner", {"reduction_factor": 2.5}, "pruner.options.reduction_factor", "expected an integer"),
    ],
)
def test_bad_options(
    minilm_spec_data: SpecData, spec_data_root: Path, section: str, options: dict[str, Any], field: str, reason: str
) -> None:
    data = minilm_spec_data()
    data[section]["options"] = options
    err = invalid(data, [spec_data_root])
    assert err.field == field and reason in err.reason


def test_required_pruner_options(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    err = invalid(minilm_spec_data(pruner={"name": "percentile"}), [spec_data_root])
    assert (err.field, err.reason) == ("pruner.options.percentile", "required by PercentilePruner")
    err = invalid(minilm_spec_data(pruner={"name": "threshold"}), [spec_data_root])
    assert (err.field, err.reason) == ("pruner.options", "Either lower or upper must be specified.")


def test_good_options_pass(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        sampler={"name": "tpe", "options": {"n_startup_trials": 5, "multivariate": False}},
        pruner={"name": "median", "options": {"n_startup_trials": 3, "n_warmup_steps": 100}},
    )
    check_spec(StudySpec.model_validate(data), [spec_data_root])


def test_nan_bound_is_rejected(minilm_spec_data: SpecData) -> None:
    data = minilm_spec_data(search_space={"learning_rate": {"type": "float", "low": float("nan"), "high": 1e-3}})
    with pytest.raises(ValidationError) as err:
        StudySpec.model_validate(data)
    fields = [field for field, _ in validation_messages(err.value)]
    assert "search_space.learning_rate.low" in fields


# ---------------------------------------------------------------------------- hardening (issue 7)

HUGE = 10**400


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("budget", {"n_trials": 5, "timeout_s": 1e300}, "budget.timeout_s"),
        ("budget", {"n_trials": 5, "trial_timeout_s": 365 * 86400 + 1}, "budget.trial_timeout_s"),
        ("run", {"max_steps": 10**9}, "run.max_steps"),
        ("run", {"eval_every_steps": HUGE}, "run.eval_every_steps"),
        ("run", {"seed": 2**32}, "run.seed"),
        ("data", {"max_eval_examples": 10**10}, "data.max_eval_examples"),
        ("sampler", {"seed": 2**32}, "sampler.seed"),
        ("warm_start_from", {"study": "old", "n_best": 101}, "warm_start_from.n_best"),
    ],
)
def test_every_duration_and_count_is_bounded(
    minilm_spec_data: SpecData, section: str, values: dict[str, Any], field: str
) -> None:
    [(named, reason)] = messages(minilm_spec_data(**{section: values}))
    assert named == field and "less than or equal to" in reason


def test_a_year_is_the_longest_duration(minilm_spec_data: SpecData) -> None:
    budget = {"timeout_s": 365 * 86400, "trial_timeout_s": 365 * 86400}
    assert StudySpec.model_validate(minilm_spec_data(budget=budget)).budget.timeout_s == 365 * 86400


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"search_space": {"num_layers": {"type": "int", "low": 1, "high": HUGE}}}, "search_space.num_layers.high"),
        ({"search_space": {"num_layers": {"type": "int", "low": -HUGE, "high": 2}}}, "search_space.num_layers.low"),
        ({"search_space": {"batch_size": {"type": "categorical", "choices": [1, HUGE]}}}, "search_space.batch_size"),
        ({"fixed": {"epochs": 2**63}}, "fixed.epochs"),
        ({"sampler": {"name": "tpe", "options": {"n_startup_trials": HUGE}}}, "sampler.options.n_startup_trials"),
        ({"warm_start_from": {"study": HUGE}}, "warm_start_from.study"),
    ],
)
def test_integers_beyond_64_bits_are_schema_errors(
    minilm_spec_data: SpecData, change: dict[str, Any], field: str
) -> None:
    fields = [f for f, _ in messages(minilm_spec_data(**change))]
    assert any(f.startswith(field) for f in fields), fields


@pytest.mark.parametrize(
    ("dim", "field", "words"),
    [
        ({"low": 0.0, "high": 0.5, "step": 5e-324}, "search_space.dropout.step", "too fine"),
        ({"low": 0.0, "high": 0.5, "step": 1e-7}, "search_space.dropout.step", "more than 1,000,000 points"),
        ({"low": 0.5, "high": 0.5000000000000001}, "search_space.dropout", "too narrow"),
        ({"low": 5e-324, "high": 0.5}, "search_space.dropout.low", "too close to 0"),
        ({"low": -1e308, "high": 1e308}, "search_space.dropout.low", "outside the limits"),
    ],
)
def test_float_ranges_that_break_sampling(
    minilm_spec_data: SpecData, spec_data_root: Path, dim: dict[str, Any], field: str, words: str
) -> None:
    data = minilm_spec_data(search_space={"dropout": {"type": "float", **dim}})
    err = invalid(data, [spec_data_root])
    assert err.field == field and words in err.reason


def test_a_fine_but_bounded_step_passes(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(search_space={"dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 1e-6}})
    check_spec(StudySpec.model_validate(data), [spec_data_root])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"description": "nul\x00byte"}, "description"),
        ({"dataset": {"kind": "files", "train": "train.csv\x00"}}, "dataset.train"),
        ({"dataset": {"kind": "files", "train": "train.csv", "label_column": "\x00"}}, "dataset.label_column"),
        ({"fixed": {"optimizer": "sgd\x00"}}, "fixed.optimizer"),
        ({"pruner": {"name": "asha", "options": {"min_resource": "auto\x00"}}}, "pruner.options.min_resource"),
    ],
)
def test_nul_is_refused_in_every_string(
    minilm_spec_data: SpecData, spec_data_root: Path, change: dict[str, Any], field: str
) -> None:
    err = invalid(minilm_spec_data(**change), [spec_data_root])
    assert (err.field, "NUL" in err.reason) == (field, True)


def test_choice_key_takes_any_integer() -> None:
    from service.spec import choice_key

    assert choice_key(HUGE) != choice_key(1.0) == choice_key(1) != choice_key(True)


@pytest.mark.parametrize("name", [".", "..", "-rf", "_x", "a\n", "ａｂ", "a b", ""])
def test_study_names_are_plain(minilm_spec_data: SpecData, name: str) -> None:
    assert [f for f, _ in messages(minilm_spec_data(name=name))] == ["name"]


@pytest.mark.parametrize("encoding", ["klingon", "base64", "zip"])
def test_file_encoding_must_be_a_text_encoding(spec_data_root: Path, minilm_spec_data: SpecData, encoding: str) -> None:
    data = minilm_spec_data(dataset={"kind": "files", "train": "train.csv", "encoding": encoding})
    err = invalid(data, [spec_data_root])
    assert err.field == "dataset.encoding" and encoding in err.reason
