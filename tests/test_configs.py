"""Config dataclasses: validation names the bad value, round trips through dicts and artifact metadata,
callbacks take a config or the same keywords, and a resumed run with other options is refused."""

from __future__ import annotations

import dataclasses
import json
import typing
import warnings

import pytest
import torch
import transformers as T
from conftest import make_model, random_input_ids, skip_unless_trainer_resumes

import hfhooks
from hfhooks import (
    AlignmentConfig,
    AttributionAlignment,
    AttributionAlignmentCallback,
    CallbackStateError,
    Config,
    GradientMask,
    GradientMaskCallback,
    GradientMaskConfig,
    GradientRoutingCallback,
    LayerRestorationCallback,
    ParamIndex,
    ParamMask,
    RestorationConfig,
    Router,
    RoutingConfig,
    SaliencyUnlearningCallback,
    SalUnConfig,
    UnlearningEvalCallback,
    UnlearningEvalConfig,
    UnlearningObjective,
    dedicated_mask,
)
from hfhooks.attribution.distances import DISTANCES
from hfhooks.attribution.methods import METHODS
from hfhooks.freeze.gradient_mask import FREEZE_MODES
from hfhooks.io.artifacts import read_artifact
from hfhooks.trainer.state import STATE_DIR, load_mask, load_state
from hfhooks.unlearning.objectives import OBJECTIVES

CONFIGS = [
    GradientMaskConfig,
    RoutingConfig,
    SalUnConfig,
    UnlearningEvalConfig,
    AlignmentConfig,
    RestorationConfig,
]

# (config, field, bad value): each must raise ValueError naming the field and the value
BAD = [
    (GradientMaskConfig, "freeze", "soft"),
    (GradientMaskConfig, "others", "thaw"),
    (GradientMaskConfig, "verify", "yes"),
    (GradientMaskConfig, "check_finite", 1),
    (RoutingConfig, "level", "token"),
    (RoutingConfig, "label_name", ""),
    (RoutingConfig, "strict", "no"),
    (RoutingConfig, "forget_weights", (1.0,)),
    (RoutingConfig, "retain_weights", (0.0, float("nan"))),
    (RoutingConfig, "shared_on_forget", "*embed*"),
    (RoutingConfig, "layers", [0, "1"]),
    (RoutingConfig, "mlp_units", -1),
    (RoutingConfig, "heads", [-2]),
    (SalUnConfig, "objective", "forget_everything"),
    (SalUnConfig, "ratio", 0),
    (SalUnConfig, "ratio", 1.5),
    (SalUnConfig, "retain_weight", -0.5),
    (SalUnConfig, "batch_size", 0),
    (SalUnConfig, "freeze", "soft"),
    (SalUnConfig, "progress", None),
    (UnlearningEvalConfig, "every", 0),
    (UnlearningEvalConfig, "batch_size", 2.5),
    (UnlearningEvalConfig, "retrain", {"UA": 1.0}),
    (UnlearningEvalConfig, "restore_best", "true"),
    (AlignmentConfig, "method", "shap"),
    (AlignmentConfig, "distance", "l1"),
    (AlignmentConfig, "weight", -1.0),
    (AlignmentConfig, "every", 0),
    (AlignmentConfig, "fraction", 0),
    (AlignmentConfig, "fraction", 1.01),
    (AlignmentConfig, "target", "gold"),
    (AlignmentConfig, "score", "prob"),
    (AlignmentConfig, "steps", 0),
    (AlignmentConfig, "reuse_backward", "always"),
    (AlignmentConfig, "special_token_ids", ["cls"]),
    (AlignmentConfig, "prior", ""),
    (RestorationConfig, "when", "epoch"),
    (RestorationConfig, "when", ()),
    (RestorationConfig, "mode", "copy"),
    (RestorationConfig, "variant", "../up"),
    (RestorationConfig, "adapters", "keep"),
    (RestorationConfig, "lm_head", "yes"),
]


@pytest.mark.parametrize(("cls", "name", "value"), BAD, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in BAD])
def test_every_config_rejects_a_bad_value_naming_it(cls, name, value):
    with pytest.raises(ValueError) as err:
        cls(**{name: value})
    message = str(err.value)
    assert f"{cls.__name__}.{name}" in message and repr(value) in message


@pytest.mark.parametrize(
    ("cls", "name", "choices"),
    [
        (GradientMaskConfig, "freeze", FREEZE_MODES),
        (SalUnConfig, "objective", OBJECTIVES),
        (AlignmentConfig, "method", METHODS),
        (AlignmentConfig, "distance", DISTANCES),
    ],
)
def test_a_literal_mode_lists_the_allowed_values_and_matches_the_mechanism(cls, name, choices):
    """The Literal spells out the same modes as the mechanism's constant (they must not drift apart), and the
    error lists them all."""
    hint = typing.get_type_hints(cls)[name]
    literal = typing.get_args(hint)[0] if typing.get_origin(hint) is not typing.Literal else hint
    assert set(typing.get_args(literal)) == set(choices)
    with pytest.raises(ValueError) as err:
        cls(**{name: "nope"})
    assert all(repr(c) in str(err.value) for c in choices)


NON_DEFAULT = {
    GradientMaskConfig: dict(freeze="groups", others="train", verify=False),
    RoutingConfig: dict(
        level="activation", layers=slice(0, 2), mlp_units=[1, 2], heads=0, forget_weights=[1, 0.5],
        shared_on_forget=["*embed*"], save_mask="ded.safetensors", strict=False,
    ),
    SalUnConfig: dict(objective="npo", ratio=0.25, retain_weight=0.0, batch_size=4, freeze="grad"),
    UnlearningEvalConfig: dict(every=3, retrain={"UA": 1.0, "RA": 99.0, "TA": 90.0, "MIA": 10}, restore_best=True),
    AlignmentConfig: dict(method="input_gradient", distance="rrr", weight=0.5, fraction=0.5, special_token_ids=[0, 2]),
    RestorationConfig: dict(when=("save", "train_end"), mode="variant", variant="base", lm_head=True, adapters="drop"),
}  # fmt: skip


@pytest.mark.parametrize("cls", CONFIGS)
def test_from_dict_of_to_dict_round_trips_through_json(cls):
    for cfg in (cls(), cls(**NON_DEFAULT[cls])):
        record = json.loads(json.dumps(cfg.to_dict()))  # what an artifact's metadata holds
        assert cls.from_dict(record) == cfg
        assert set(cls.help()) >= set(record) and all(cls.help().values())  # every field documented


def test_from_dict_names_unknown_fields_and_unrebuildable_objects():
    with pytest.raises(ValueError, match=r"'fraze'.*known: .*freeze"):
        GradientMaskConfig.from_dict({"fraze": "hard"})

    class MyPrior:
        tags = ()

    record = AlignmentConfig(prior=MyPrior()).to_dict()
    assert record["prior"] == {"object": "MyPrior"}
    with pytest.raises(ValueError, match="MyPrior object"):
        AlignmentConfig.from_dict(record)


def test_every_config_is_exported_and_documented_in_its_method_page():
    for cls in CONFIGS:
        assert getattr(hfhooks, cls.__name__) is cls and cls.__name__ in hfhooks.__all__
        assert issubclass(cls, Config)
    pages = {
        GradientMaskConfig: "gradient_masking",
        RoutingConfig: "routing",
        SalUnConfig: "unlearning",
        UnlearningEvalConfig: "unlearning",
        AlignmentConfig: "attribution",
        RestorationConfig: "restoration",
    }
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    for cls, page in pages.items():
        text = (docs / f"{page}.md").read_text()
        missing = [f for f in cls.help() if f"`{f}`" not in text]
        assert cls.__name__ in text and not missing, (page, missing)


# -- callbacks and mechanisms take a config or the same keywords --------------------------------------------------


def _mask(model) -> ParamMask:
    return ParamMask({n: torch.rand(p.shape) > 0.5 for n, p in ParamIndex(model).items() if p.dim() == 2})


def _builders(model):
    """(config class, keywords, build(config=None, **kw)) for every callback and mechanism."""
    mask, ded, ref = _mask(model), dedicated_mask(model, mlp_units=4, heads=1), {}
    return [
        (GradientMaskConfig, dict(freeze="grad", verify=False), lambda **kw: GradientMaskCallback(mask, **kw)),
        (GradientMaskConfig, dict(freeze="groups", others="train"), lambda **kw: GradientMask(model, mask, **kw)),
        (RoutingConfig, dict(level="activation", mlp_units=4), lambda **kw: GradientRoutingCallback(**kw)),
        (RoutingConfig, dict(strict=False, shared_on_forget=["*norm*"]), lambda **kw: Router(model, ded, **kw)),
        (SalUnConfig, dict(objective="ga", ratio=0.2), lambda **kw: SaliencyUnlearningCallback([], **kw)),
        (UnlearningEvalConfig, dict(every=7), lambda **kw: UnlearningEvalCallback([], [], [], **kw)),
        (AlignmentConfig, dict(method="input_gradient", weight=0.3), lambda **kw: AttributionAlignmentCallback(**kw)),
        (AlignmentConfig, dict(fraction=0.5, seed=3), lambda **kw: AttributionAlignment(make_model("bert"), **kw)),
        (RestorationConfig, dict(when="save", mode="variant"), lambda **kw: LayerRestorationCallback(ref, [0], **kw)),
    ]  # fmt: skip


def test_callbacks_and_mechanisms_take_a_config_or_the_same_keywords():
    model = make_model("llama")
    for cls, kw, build in _builders(model):
        by_config, by_keywords = build(config=cls(**kw)), build(**kw)
        assert by_config.config == by_keywords.config == cls(**kw), cls
        # keywords given with a config replace its fields (dataclasses.replace: validated again)
        first, value = next(iter(kw.items()))
        base = dataclasses.replace(cls(**kw), **{first: getattr(cls(), first)})
        assert build(config=base, **{first: value}).config == cls(**kw)
        with pytest.raises(ValueError, match=cls.__name__):
            build(config=cls(**kw), **{first: "not-a-valid-value"})


def test_the_callbacks_run_with_their_config():
    model = make_model("llama")
    cb = GradientMaskCallback(_mask(model), config=GradientMaskConfig(freeze="grad", others="train"))
    assert (cb.freeze, cb.others) == ("grad", "train")
    router = Router(
        model, dedicated_mask(model, mlp_units=4), config=RoutingConfig(level="activation", strict=False)
    )
    assert (router.level, router.strict) == ("activation", False)
    assert (
        RoutingConfig().strict is True and GradientRoutingCallback().strict is True
    )  # strict stays the default
    salun = SaliencyUnlearningCallback([], objective=UnlearningObjective("graddiff", retain_weight=0.5))
    assert (salun.config.objective, salun.config.retain_weight) == ("graddiff", 0.5)
    with pytest.raises(ValueError, match="contradicts"):
        SaliencyUnlearningCallback(
            [], objective=UnlearningObjective("ga", retain_weight=0.0), retain_weight=1.0
        )


def test_an_unknown_keyword_is_a_type_error_naming_the_allowed_ones():
    model = make_model("llama")
    for cls, _, build in _builders(model):
        with pytest.raises(TypeError, match=r"unexpected keyword argument 'colour'.*options are: .*") as err:
            build(colour="red")
        assert all(name in str(err.value) for name in ("config=" + cls.__name__,)), err.value
    # a mechanism refuses the callback-only fields instead of ignoring them
    with pytest.raises(TypeError, match="'mlp_units'"):
        Router(model, dedicated_mask(model, mlp_units=4), mlp_units=8)
    with pytest.raises(TypeError, match="'resume_from'"):
        GradientMask(model, _mask(model), resume_from=False)
    with pytest.raises(TypeError, match="takes a GradientMaskConfig"):
        GradientMaskCallback(_mask(model), config=RoutingConfig())


def test_attribution_callback_checks_its_options_at_construction():
    """The old callback stored **kwargs and only built AttributionAlignment (which checks them) at train start."""
    with pytest.raises(ValueError, match=r"AlignmentConfig\.fraction=2"):
        AttributionAlignmentCallback(prior="rationale", fraction=2)
    with pytest.raises(TypeError, match="'weigth'"):
        AttributionAlignmentCallback(prior="rationale", weigth=0.5)
    with pytest.raises(ValueError, match="reuse_backward=True needs"):
        AttributionAlignmentCallback("grad_x_input", reuse_backward=True)


# -- configs recorded in artifacts ---------------------------------------------------------------------------------


class _State:
    def __init__(self, step: int):
        self.global_step, self.log_history, self.is_world_process_zero = step, [], True


def _checkpoint(tmp_path, step: int = 3):
    """TrainingArguments and a TrainerState for ``<tmp>/checkpoint-<step>`` (a directory with the state file a
    resumed run's checkpoint must hold)."""
    args = T.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    ckpt = tmp_path / f"checkpoint-{step}"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return args, _State(step)


def test_a_mask_saved_by_a_callback_records_its_config_and_the_version(tmp_path):
    model = make_model("llama")
    args, state = _checkpoint(tmp_path)
    cfg = GradientMaskConfig(freeze="groups", others="train", verify=False)
    GradientMaskCallback(_mask(model), config=cfg).on_save(args, state, None, model=model)
    path = tmp_path / "checkpoint-3" / STATE_DIR / "GradientMaskCallback.mask.safetensors"
    _, meta = read_artifact(path, "mask")
    assert meta["version"] == hfhooks.__version__
    assert GradientMaskConfig.from_dict(meta["config"]) == cfg
    assert GradientMaskConfig.from_dict(ParamMask.load(path).metadata["config"]) == cfg


def test_routing_state_and_masks_record_the_config(tmp_path):
    """The checkpoint's mask and state file, the save_mask copy and the dedicated mask the callback built all
    carry the RoutingConfig; a resumed run with another level is refused, naming it."""
    model = make_model("llama")
    args, state = _checkpoint(tmp_path)
    cfg = RoutingConfig(level="activation", mlp_units=4, heads=1, save_mask=str(tmp_path / "ded.safetensors"))
    cb = GradientRoutingCallback(config=cfg)
    fresh = _State(0)
    opt = torch.optim.AdamW(model.parameters())
    cb.on_train_begin(args, fresh, T.TrainerControl(), model=model, optimizer=opt)
    cb.on_train_end(args, fresh, T.TrainerControl())
    assert RoutingConfig.from_dict(cb.dedicated.metadata["config"]) == cfg
    assert RoutingConfig.from_dict(ParamMask.load(tmp_path / "ded.safetensors").metadata["config"]) == cfg
    cb.on_save(args, state, T.TrainerControl(), model=model)
    _, meta = read_artifact(
        tmp_path / "checkpoint-3" / STATE_DIR / "GradientRoutingCallback.safetensors", "callback_state"
    )
    assert RoutingConfig.from_dict(meta["config"]) == cfg and meta["version"] == hfhooks.__version__
    assert load_state(args, state, "GradientRoutingCallback", None, config=cfg) is not None
    # where the extra copy goes may change on resume; the routing level may not
    moved = dataclasses.replace(cfg, save_mask=str(tmp_path / "elsewhere.safetensors"))
    assert load_mask(args, state, "GradientRoutingCallback", None, config=moved) == cb.dedicated
    with pytest.raises(CallbackStateError, match=r"level: checkpoint 'activation', this run 'param'"):
        load_mask(
            args, state, "GradientRoutingCallback", None, config=dataclasses.replace(cfg, level="param")
        )
    with pytest.raises(CallbackStateError, match=r"level: checkpoint 'activation', this run 'param'"):
        load_state(
            args, state, "GradientRoutingCallback", None, config=dataclasses.replace(cfg, level="param")
        )


def test_attribution_state_records_the_config_and_refuses_other_options(tmp_path):
    args, state = _checkpoint(tmp_path)
    cfg = AlignmentConfig(method="grad_x_input", prior="rationale", fraction=0.5, weight=0.25)
    cb = AttributionAlignmentCallback(config=cfg)
    cb.alignment = AttributionAlignment(make_model("bert"), config=cfg)
    cb.on_save(args, state, T.TrainerControl())
    _, meta = read_artifact(
        tmp_path / "checkpoint-3" / STATE_DIR / "AttributionAlignmentCallback.safetensors", "callback_state"
    )
    assert AlignmentConfig.from_dict(meta["config"]) == cfg
    with pytest.raises(CallbackStateError, match=r"weight: checkpoint 0\.25, this run 0\.5"):
        load_state(
            args, state, "AttributionAlignmentCallback", None, config=dataclasses.replace(cfg, weight=0.5)
        )


def _lm_data(n: int = 8):
    ids = random_input_ids(n, 8)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def _train(out, callbacks, resume=None):
    model = make_model("llama")
    args = T.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, use_cpu=True,
        report_to=[], logging_strategy="no", save_strategy="steps", save_steps=1, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = T.Trainer(
        model=model,
        args=args,
        train_dataset=_lm_data(),
        data_collator=T.default_data_collator,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)


def test_a_resumed_trainer_run_with_another_config_is_refused_naming_the_field(tmp_path):
    """End to end: the mask saved into checkpoint-1 is found again on resume; the same mask with another freeze
    mode is refused (the old code checked only the mask), while verify — an end-of-run check — may change."""
    mask = _mask(make_model("llama"))
    _train(tmp_path, [GradientMaskCallback(mask, freeze="hard")])
    ckpt = str(tmp_path / "checkpoint-1")
    saved = ParamMask.load(tmp_path / "checkpoint-1" / STATE_DIR / "GradientMaskCallback.mask.safetensors")
    assert saved == mask and saved.metadata["config"]["freeze"] == "hard"
    skip_unless_trainer_resumes()
    _train(tmp_path, [GradientMaskCallback(mask, freeze="hard", verify=False)], resume=ckpt)
    with pytest.raises(CallbackStateError, match=r"freeze: checkpoint 'hard', this run 'grad'"):
        _train(tmp_path, [GradientMaskCallback(mask, freeze="grad")], resume=ckpt)
    # resume_from=False: training on with new options, deliberately
    _train(tmp_path, [GradientMaskCallback(mask, freeze="grad", resume_from=False)], resume=ckpt)


def test_a_checkpoint_without_a_recorded_config_warns(tmp_path):
    model = make_model("llama")
    args, state = _checkpoint(tmp_path)
    folder = tmp_path / "checkpoint-3" / STATE_DIR
    _mask(model).save(folder / "GradientMaskCallback.mask.safetensors", global_step=3)  # as older hfhooks did
    with pytest.warns(UserWarning, match="records no config"):
        load_mask(args, state, "GradientMaskCallback", None, config=GradientMaskConfig())
