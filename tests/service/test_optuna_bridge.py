from __future__ import annotations

import ast
import inspect
import itertools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import InMemoryStorage
from optuna.study import StudyDirection
from optuna.trial import TrialState

from service import optuna_bridge as bridge
from service.errors import Conflict, Invalid, NotFound
from service.paths import resolve_spec_paths
from service.spec import StudySpec, check_spec
from trainer.config import NamedDataset, NamedModel

SpecData = Callable[..., dict[str, Any]]
EPOCHS = {"type": "int", "low": 1, "high": 3}
SEARCHED = ("learning_rate", "batch_size", "num_layers", "unfreeze_depth")  # minilm_spec_data's, in order

optuna.logging.set_verbosity(optuna.logging.WARNING)


def checked(data: dict[str, Any], root: Path) -> StudySpec:
    """A spec as the service stores it: checked, paths resolved."""
    spec = StudySpec.model_validate(data)
    check_spec(spec, [root])
    return resolve_spec_paths(spec, [root])


def run(spec: StudySpec, n: int, sampler: optuna.samplers.BaseSampler | None = None) -> list[dict[str, Any]]:
    """Ask/tell `n` trials in memory, the way the scheduler does; the params of each."""
    study = optuna.create_study(
        sampler=sampler or bridge.make_sampler(spec, parallel=False), directions=bridge.directions(spec)
    )
    seen = []
    for i in range(n):
        trial = study.ask()
        params = bridge.suggest_params(trial, spec)
        seen.append(params)
        study.tell(trial, [float(i % 7)] * len(spec.objectives))
    return seen


def builtin_data(minilm_spec_data: SpecData, **search: Any) -> dict[str, Any]:
    return minilm_spec_data(
        model={"kind": "builtin"},
        search_space={
            "num_heads": {"type": "categorical", "choices": [1, 2, 3, 4, 6, 8]},
            "hidden_size": {"type": "int", "low": 50, "high": 400},
            **search,
        },
    )


# ---------------------------------------------------------------------------- objectives


def test_directions_and_metrics(minilm_spec_data: SpecData) -> None:
    spec = StudySpec.model_validate(minilm_spec_data(objectives=[{"metric": "f1_macro"}, {"metric": "loss"}]))
    assert bridge.directions(spec) == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    assert bridge.objective_metrics(spec) == ["f1_macro", "loss"]


# ---------------------------------------------------------------------------- define-by-run sampling


def test_unfreeze_depth_never_exceeds_num_layers_over_200_trials(
    minilm_spec_data: SpecData, spec_data_root: Path
) -> None:
    spec = checked(minilm_spec_data(), spec_data_root)
    seen = run(spec, 200, optuna.samplers.RandomSampler(seed=1))
    for params in seen:
        assert 2 <= params["num_layers"] <= 6
        assert 0 <= params["unfreeze_depth"] <= params["num_layers"]
        assert params["batch_size"] in (16, 32, 64)
        assert 1e-5 <= params["learning_rate"] <= 1e-3
    # the clip must not collapse the space: every legal pair shows up eventually
    assert {(p["num_layers"], p["unfreeze_depth"]) for p in seen} >= {(2, 2), (6, 6), (6, 0)}


def test_tpe_with_constant_liar_keeps_the_rule(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(sampler={"name": "tpe", "seed": 3, "options": {"n_startup_trials": 5}})
    spec = checked(data, spec_data_root)
    for params in run(spec, 30, bridge.make_sampler(spec, parallel=True)):
        assert params["unfreeze_depth"] <= params["num_layers"]


def test_categorical_unfreeze_with_all_raises_num_layers_low(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data()
    data["search_space"]["num_layers"] = {"type": "int", "low": 1, "high": 6}
    data["search_space"]["unfreeze_depth"] = {"type": "categorical", "choices": [0, 3, "all"]}
    spec = checked(data, spec_data_root)
    seen = run(spec, 200, optuna.samplers.RandomSampler(seed=2))
    for params in seen:
        depth = params["unfreeze_depth"]
        assert depth == "all" or depth <= params["num_layers"]
    assert {p["unfreeze_depth"] for p in seen} == {0, 3, "all"}
    assert min(p["num_layers"] for p in seen if p["unfreeze_depth"] != 3) == 1


def test_unfreeze_depth_is_clipped_to_the_model_depth(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        model={"kind": "pretrained", "path": "tiny-bert"},
        search_space={"unfreeze_depth": {"type": "int", "low": 0, "high": 12}},
    )
    spec = checked(data, spec_data_root)
    assert {p["unfreeze_depth"] for p in run(spec, 100, optuna.samplers.RandomSampler(seed=4))} == {0, 1, 2, 3, 4}


def test_builtin_hidden_size_is_a_multiple_of_num_heads(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    spec = checked(builtin_data(minilm_spec_data), spec_data_root)
    seen = run(spec, 200, optuna.samplers.RandomSampler(seed=5))
    for params in seen:
        assert params["hidden_size"] % params["num_heads"] == 0
        assert 50 <= params["hidden_size"] <= 400
        bridge.build_trial_config(spec, params)  # the trainer-side validators agree
    assert {p["num_heads"] for p in seen} == {1, 2, 3, 4, 6, 8}


def test_builtin_hidden_size_with_tpe(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = builtin_data(minilm_spec_data)
    data["sampler"] = {"name": "tpe", "seed": 1, "options": {"n_startup_trials": 5}}
    spec = checked(data, spec_data_root)
    for params in run(spec, 30):
        assert params["hidden_size"] % params["num_heads"] == 0


def test_builtin_hidden_size_with_fixed_heads_and_a_step(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        model={"kind": "builtin"},
        search_space={"hidden_size": {"type": "int", "low": 100, "high": 600, "step": 8}},
        fixed={"num_heads": 12},
    )
    spec = checked(data, spec_data_root)
    sizes = {p["hidden_size"] for p in run(spec, 100, optuna.samplers.RandomSampler(seed=6))}
    assert all(s % 24 == 0 and 100 <= s <= 600 for s in sizes)  # lcm(8, 12) = 24
    assert bridge.distributions(spec, {"hidden_size": 120})["hidden_size"] == IntDistribution(120, 600, step=24)


def test_enqueued_params_are_used_as_given(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    spec = checked(minilm_spec_data(), spec_data_root)
    params = bridge.check_params(
        spec, {"learning_rate": 2e-4, "batch_size": 32, "num_layers": 3, "unfreeze_depth": 3}
    )
    study = optuna.create_study(sampler=bridge.make_sampler(spec, parallel=False), direction="maximize")
    study.enqueue_trial(params)
    assert bridge.suggest_params(study.ask(), spec) == params


# ---------------------------------------------------------------------------- grid


def test_grid_enumerates_exactly_the_product(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        sampler={"name": "grid", "seed": 1},
        pruner={"name": "none"},
        search_space={
            "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
            "batch_size": {"type": "int", "low": 16, "high": 48, "step": 16},
            "dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1},
            "num_layers": {"type": "int", "low": 4, "high": 5},
            "unfreeze_depth": {"type": "categorical", "choices": [0, 2, "all"]},
        },
    )
    spec = checked(data, spec_data_root)
    grid = bridge.grid_space(spec)
    assert grid["dropout"] == [0.0, 0.1, 0.2]
    assert bridge.grid_size(spec) == 108
    sampler = bridge.make_sampler(spec, parallel=False)
    assert isinstance(sampler, optuna.samplers.GridSampler)
    study = optuna.create_study(sampler=sampler)
    names = list(grid)
    seen = []
    for _ in range(2 * 3 * 3 * 2 * 3):
        trial = study.ask()
        seen.append(tuple(bridge.suggest_params(trial, spec)[n] for n in names))
        study.tell(trial, 0.0)  # the last one too: Optuna's own GridSampler would raise here
    assert sorted(seen, key=repr) == sorted(itertools.product(*grid.values()), key=repr)
    assert len(set(seen)) == len(seen) == 108
    assert sampler.is_exhausted(study)


def test_grid_values_for_hidden_size_follow_fixed_heads(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        model={"kind": "builtin"},
        sampler={"name": "grid"},
        search_space={"hidden_size": {"type": "int", "low": 60, "high": 200}},
        fixed={"num_heads": 32},
    )
    assert bridge.grid_space(checked(data, spec_data_root)) == {"hidden_size": [64, 96, 128, 160, 192]}


# ---------------------------------------------------------------------------- samplers and pruners


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("random", optuna.samplers.RandomSampler),
        ("grid", bridge.AskTellGridSampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
        ("gp", optuna.samplers.GPSampler),
        ("qmc", optuna.samplers.QMCSampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
    ],
)
def test_each_sampler_constructs(minilm_spec_data: SpecData, name: str, cls: type) -> None:
    data = minilm_spec_data(sampler={"name": name, "seed": 11}, search_space={"epochs": EPOCHS})
    assert type(bridge.make_sampler(StudySpec.model_validate(data), parallel=False)) is cls


# qmc's first sample imports scipy.stats, seconds of a test run for nothing this test would learn
@pytest.mark.parametrize("name", ["tpe", "random", "grid", "cmaes", "gp", "nsga2"])
def test_samplers_run_trials(minilm_spec_data: SpecData, spec_data_root: Path, name: str) -> None:
    data = minilm_spec_data(sampler={"name": name, "seed": 11}, search_space={"epochs": EPOCHS})
    seen = [p["epochs"] for p in run(checked(data, spec_data_root), 3)]
    assert len(seen) == 3 and set(seen) <= {1, 2, 3}


def test_sampler_whose_package_is_missing_is_rejected(
    minilm_spec_data: SpecData, spec_data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = bridge.importlib.util.find_spec
    monkeypatch.setattr(bridge.importlib.util, "find_spec", lambda name: None if name == "cmaes" else real(name))
    spec = StudySpec.model_validate(minilm_spec_data(sampler={"name": "cmaes"}))
    with pytest.raises(Invalid) as err:
        check_spec(spec, [spec_data_root])
    assert (err.value.field, err.value.reason) == (
        "sampler.name",
        "cmaes needs the Python package 'cmaes', which is not installed on the server",
    )


def test_tpe_uses_the_constant_liar_only_in_parallel(minilm_spec_data: SpecData) -> None:
    spec = StudySpec.model_validate(minilm_spec_data())
    assert bridge.make_sampler(spec, parallel=True)._constant_liar is True
    assert bridge.make_sampler(spec, parallel=False)._constant_liar is False
    overridden = StudySpec.model_validate(minilm_spec_data(sampler={"name": "tpe", "options": {"constant_liar": True}}))
    assert bridge.make_sampler(overridden, parallel=False)._constant_liar is True


@pytest.mark.parametrize(
    ("pruner", "cls"),
    [
        ({"name": "none"}, optuna.pruners.NopPruner),
        ({"name": "median", "options": {"n_startup_trials": 2}}, optuna.pruners.MedianPruner),
        ({"name": "percentile", "options": {"percentile": 25.0}}, optuna.pruners.PercentilePruner),
        ({"name": "successive_halving"}, optuna.pruners.SuccessiveHalvingPruner),
        ({"name": "asha", "options": {"reduction_factor": 3}}, optuna.pruners.SuccessiveHalvingPruner),
        ({"name": "hyperband", "options": {"max_resource": 30}}, optuna.pruners.HyperbandPruner),
        ({"name": "wilcoxon"}, optuna.pruners.WilcoxonPruner),
        ({"name": "threshold", "options": {"lower": 0.2}}, optuna.pruners.ThresholdPruner),
    ],
)
def test_each_pruner_constructs(
    minilm_spec_data: SpecData, spec_data_root: Path, pruner: dict[str, Any], cls: type
) -> None:
    spec = checked(minilm_spec_data(pruner=pruner), spec_data_root)
    assert type(bridge.make_pruner(spec)) is cls


def test_record_constraint_is_read_by_optuna(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(sampler={"name": "tpe", "seed": 0, "options": {"n_startup_trials": 2}})
    spec = checked(data, spec_data_root)
    study = optuna.create_study(sampler=bridge.make_sampler(spec, parallel=False), direction="maximize")
    for i in range(6):
        trial = study.ask()
        bridge.suggest_params(trial, spec)
        if i % 2:
            bridge.record_constraint(study._storage, trial._trial_id, 1.0)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, 0.5)
    pruned = study.get_trials(states=[TrialState.PRUNED])
    assert [t.constraints for t in pruned] == [{bridge.CONSTRAINT_NAME: 1.0}] * 3
    bridge.suggest_params(study.ask(), spec)  # TPE samples with infeasible trials around
    with pytest.raises(ValueError, match="NaN"):
        bridge.record_constraint(study._storage, 0, float("nan"))


def test_builtin_default_depth_matches_the_trainer() -> None:
    # read the constant from source: importing trainer.modeling.builtin loads torch and transformers
    source = (Path(__file__).parents[2] / "trainer" / "modeling" / "builtin.py").read_text()
    assigned = {
        target.id: node.value.value
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert assigned["DEFAULT_NUM_LAYERS"] == bridge.BUILTIN_DEFAULT_LAYERS


# ---------------------------------------------------------------------------- params


def test_check_params_accepts_and_normalises(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    spec = checked(minilm_spec_data(), spec_data_root)
    params = bridge.check_params(
        spec, {"unfreeze_depth": 2.0, "num_layers": 4, "batch_size": 64.0, "learning_rate": 1e-4}
    )
    assert params == {"learning_rate": 1e-4, "batch_size": 64, "num_layers": 4, "unfreeze_depth": 2}
    assert list(params) == ["learning_rate", "batch_size", "num_layers", "unfreeze_depth"]
    assert type(params["unfreeze_depth"]) is int and type(params["batch_size"]) is int


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"learning_rate": 0.5}, "params.learning_rate", "0.5 is not in numbers in [1e-05, 0.001] on a log scale"),
        ({"batch_size": 48}, "params.batch_size", "48 is not in one of 16, 32, 64"),
        ({"batch_size": True}, "params.batch_size", "True is not in one of 16, 32, 64"),
        ({"num_layers": 2.5}, "params.num_layers", "2.5 is not in integers in [2, 6]"),
        (
            {"num_layers": 3, "unfreeze_depth": 5},
            "params.unfreeze_depth",
            "5 is not in integers in [0, 3] (unfreeze_depth cannot exceed num_layers)",
        ),
        ({"optimizer": "sgd"}, "params.optimizer", "optimizer is not in the study's search space"),
        ({"lr": 0.1}, "params.lr", f"unknown knob; searched knobs: {', '.join(SEARCHED)}"),
    ],
)
def test_check_params_rejects(
    minilm_spec_data: SpecData, spec_data_root: Path, change: dict[str, Any], field: str, reason: str
) -> None:
    spec = checked(minilm_spec_data(), spec_data_root)
    params = {"learning_rate": 1e-4, "batch_size": 32, "num_layers": 4, "unfreeze_depth": 2, **change}
    with pytest.raises(Invalid) as err:
        bridge.check_params(spec, params)
    assert (err.value.field, err.value.reason) == (field, reason)


def test_check_params_needs_every_searched_knob_and_refuses_fixed_ones(
    minilm_spec_data: SpecData, spec_data_root: Path
) -> None:
    spec = checked(minilm_spec_data(fixed={"epochs": 2}), spec_data_root)
    with pytest.raises(Invalid) as err:
        bridge.check_params(spec, {"learning_rate": 1e-4, "batch_size": 32, "num_layers": 4})
    assert err.value.field == "params.unfreeze_depth"
    assert err.value.reason == "missing: every searched knob needs a value"
    with pytest.raises(Invalid) as err:
        bridge.check_params(spec, {"epochs": 3})
    assert (err.value.field, err.value.reason) == ("params.epochs", "epochs is fixed to 2 by the study, not searched")


def test_distributions_match_what_the_trial_used(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    spec = checked(minilm_spec_data(), spec_data_root)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    for _ in range(20):
        trial = study.ask()
        params = bridge.suggest_params(trial, spec)
        assert bridge.distributions(spec, params) == trial.distributions
        study.tell(trial, 0.1)
    # warm start: a finished trial added with these distributions is accepted next to them
    params = {"learning_rate": 3e-4, "batch_size": 16, "num_layers": 2, "unfreeze_depth": 1}
    dists = bridge.distributions(spec, params)
    assert dists["unfreeze_depth"] == IntDistribution(0, 2)
    assert dists["learning_rate"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert dists["batch_size"] == CategoricalDistribution([16, 32, 64])
    study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=0.9))
    assert study.best_trial.params == params


def test_params_to_hparams_layers_defaults_fixed_and_params(minilm_spec_data: SpecData) -> None:
    spec = StudySpec.model_validate(minilm_spec_data(fixed={"epochs": 2, "dropout": 0.3}))
    hp = bridge.params_to_hparams(spec, {"learning_rate": 1e-4, "batch_size": 16, "num_layers": 3, "unfreeze_depth": 1})
    assert (hp.learning_rate, hp.batch_size, hp.num_layers, hp.unfreeze_depth) == (1e-4, 16, 3, 1)
    assert (hp.epochs, hp.dropout) == (2, 0.3)
    assert (hp.optimizer, hp.max_seq_len) == ("adamw", 128)
    with pytest.raises(Invalid) as err:
        bridge.params_to_hparams(spec, {"batch_size": 0})
    assert err.value.field == "params.batch_size"


def test_build_trial_config(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(run={"seed": 5, "max_steps": 100}, data={"max_train_examples": 500})
    spec = checked(data, spec_data_root)
    config = bridge.build_trial_config(
        spec, {"learning_rate": 1e-4, "batch_size": 16, "num_layers": 3, "unfreeze_depth": "all"}
    )
    assert config.model == NamedModel(name="all-minilm-l6-v2")
    assert config.dataset == NamedDataset(name="tweets-sentiment")
    assert (config.run.seed, config.run.max_steps, config.data.max_train_examples) == (5, 100, 500)
    assert (config.hparams.num_layers, config.hparams.unfreeze_depth) == (3, "all")
    with pytest.raises(Invalid) as err:
        bridge.build_trial_config(spec, {"num_layers": 2, "unfreeze_depth": 3})
    assert err.value.field == "params" and "cannot exceed" in err.value.reason


# ---------------------------------------------------------------------------- studies and storage


def test_multi_objective_study_has_two_directions(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    data = minilm_spec_data(
        objectives=[{"metric": "accuracy"}, {"metric": "loss"}], sampler={"name": "nsga2"}, pruner={"name": "none"}
    )
    spec = checked(data, spec_data_root)
    study = bridge.create_optuna_study(spec, InMemoryStorage(), "multi")
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    assert study.metric_names == ["accuracy", "loss"]
    assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
    trial = study.ask()
    bridge.suggest_params(trial, spec)
    study.tell(trial, [0.8, 0.4])
    assert study.best_trials[0].values == [0.8, 0.4]


def test_create_and_load_on_an_rdb_storage(minilm_spec_data: SpecData, spec_data_root: Path, tmp_path: Path) -> None:
    spec = checked(minilm_spec_data(budget={"n_trials": 10, "max_parallel": 4}), spec_data_root)
    storage = bridge.make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert isinstance(storage, optuna.storages.RDBStorage)
    created = bridge.create_optuna_study(spec, storage, "alice.minilm.1")
    with pytest.raises(Conflict, match="already exists"):
        bridge.create_optuna_study(spec, storage, "alice.minilm.1")
    loaded = bridge.load_optuna_study(spec, storage, "alice.minilm.1")
    assert loaded._study_id == created._study_id
    assert isinstance(loaded.pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert loaded.sampler._constant_liar is True  # max_parallel > 1
    with pytest.raises(NotFound):
        bridge.load_optuna_study(spec, storage, "nobody.nothing.0")
    # what optuna-dashboard and optuna.load_study see
    assert optuna.load_study(study_name="alice.minilm.1", storage=storage).direction == StudyDirection.MAXIMIZE


# ---------------------------------------------------------------------------- option tables (issue 7)


@pytest.mark.parametrize(
    ("table", "classes"),
    [(bridge.SAMPLER_OPTIONS, bridge.SAMPLERS), (bridge.PRUNER_OPTIONS, bridge.PRUNERS)],
    ids=["samplers", "pruners"],
)
def test_every_listed_option_exists_and_its_bounds_construct(
    table: dict[str, dict[str, bridge.Option]], classes: dict[str, type]
) -> None:
    """The tables follow the installed Optuna: each option is a constructor argument, and
    each end of its range is a value the constructor takes."""
    assert set(table) == set(classes)
    base = {
        "percentile": {"percentile": 50.0},
        "successive_halving": {"min_resource": 1},
        "hyperband": {"max_resource": 10},
        "threshold": {"lower": 0, "upper": 1},
    }
    for name, options in table.items():
        cls = classes[name]
        params = inspect.signature(cls).parameters
        for key, option in options.items():
            assert key in params, (name, key)
            values = [option.low, option.high, *option.words] if option.kind != "bool" else [True, False]
            for value in [v for v in values if v is not None] + ([None] if option.nullable else []):
                assert option.allows(value), (name, key, value)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cls(**{**base.get(name, {}), key: value})


def test_option_allows_only_its_type_and_range() -> None:
    option = bridge.Option("int", 1, 10, words=("auto",))
    allowed = [v for v in (1, 10, "auto", 0, 11, 2.0, True, None, "x", [1]) if option.allows(v)]
    assert allowed == [1, 10, "auto"]
    assert option.text() == "an integer in [1, 10] or 'auto'"
    assert not bridge.Option(words=("sobol",)).allows(3)
    assert bridge.Option("float", 0.0, 1.0).allows(1) and not bridge.Option("bool").allows(1)


def test_grid_space_raises_only_invalid_for_a_stored_bad_step(minilm_spec_data: SpecData) -> None:
    """A spec stored before the step bound existed: the grid must say Invalid, not overflow."""
    data = minilm_spec_data(
        search_space={"dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 5e-324}}, sampler={"name": "grid"}
    )
    spec = StudySpec.model_validate(data)
    with pytest.raises(Invalid) as err:
        bridge.grid_size(spec)
    assert err.value.field.startswith("search_space.dropout")


def test_enqueued_huge_integers_are_not_contained(minilm_spec_data: SpecData, spec_data_root: Path) -> None:
    spec = checked(minilm_spec_data(), spec_data_root)
    good = {"learning_rate": 1e-4, "batch_size": 32, "num_layers": 4, "unfreeze_depth": 2}
    for knob in good:
        with pytest.raises(Invalid) as err:
            bridge.check_params(spec, {**good, knob: 10**400})
        assert err.value.field == f"params.{knob}" and "a huge integer" in err.value.reason
