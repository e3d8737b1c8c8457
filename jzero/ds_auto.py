"""``"auto"`` values: the Hugging Face Trainer's DeepSpeed convention, resolved as its integration does.

``transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig`` replaces each ``"auto"`` with a value it derives
from the Trainer's arguments or the model. jzero has no Trainer, so (listed in :data:`RULES`):

* the batch triple: ``"auto"`` = not given; DeepSpeed's rule derives it from the other two (HF fills them all
  from ``per_device_train_batch_size`` x ``gradient_accumulation_steps`` x world size, the same equation);
* values HF derives from the model: ``reduce_bucket_size`` = d_model**2, ``stage3_param_persistence_threshold``
  = 10 * d_model (d_model from ``model``); ``stage3_prefetch_bucket_size`` has no effect under XLA
  (:mod:`jzero.ds_keys`), so any value, ``"auto"`` included, is accepted and named at start;
* values HF derives from the run: ``scheduler.params.total_num_steps`` = ``train.steps``,
  ``scheduler.params.warmup_max_lr`` = the optimizer's lr;
* Trainer hyperparameters with no jzero source: the ``TrainingArguments`` defaults HF would fill in with no
  command-line flags (learning_rate 5e-5, adam_beta1/2 0.9/0.999, adam_epsilon 1e-8, weight_decay 0,
  max_grad_norm 1.0, warmup_steps 0, fp16/bf16 off; Apex AMP off: HF sets ``amp.enabled`` to
  ``fp16 and fp16_backend == "apex"``, and ``amp.opt_level`` to ``fp16_opt_level``, default "O1").
  ``amp.*`` resolve before :mod:`jzero.ds_keys`' table (:func:`resolve_auto_before_keys`), which refuses an
  ``amp`` section that is on; ``amp.enabled: true`` stays that error.

Every value filled in is reported (:func:`resolve_auto` returns them; the run prints them with the no-effect
keys). An ``"auto"`` anywhere else is a one-line :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import copy
from typing import Any

from jzero.errors import ConfigError

AUTO = "auto"
#: jzero's own sections, where "auto" is an ordinary value of some keys (model.attention: auto)
JZERO_SECTIONS = ("mesh", "model", "data", "train", "finetune", "pipeline", "checkpoint")

#: HF TrainingArguments defaults (transformers/training_args.py) for the keys HF fills from them
HF_DEFAULTS = {"learning_rate": 5e-5, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
               "weight_decay": 0.0, "max_grad_norm": 1.0, "warmup_steps": 0, "fp16_opt_level": "O1"}

#: key -> how HF fills it (for docs and the printed line)
RULES = {
    "train_batch_size": "derived by DeepSpeed's batch rule from the other two",
    "train_micro_batch_size_per_gpu": "derived by DeepSpeed's batch rule from the other two",
    "gradient_accumulation_steps": "derived by DeepSpeed's batch rule from the other two",
    "gradient_clipping": "HF max_grad_norm default 1.0",
    "optimizer.params.lr": "HF learning_rate default 5e-5",
    "optimizer.params.betas": "HF adam_beta1/adam_beta2 defaults [0.9, 0.999]",
    "optimizer.params.eps": "HF adam_epsilon default 1e-8",
    "optimizer.params.weight_decay": "HF weight_decay default 0.0",
    "scheduler.params.warmup_min_lr": "0, as HF",
    "scheduler.params.warmup_max_lr": "the optimizer's lr, as HF",
    "scheduler.params.warmup_num_steps": "HF warmup_steps default 0",
    "scheduler.params.total_num_steps": "train.steps (HF: max_steps)",
    "fp16.enabled": "HF --fp16 default off",
    "bf16.enabled": "HF --bf16 default off",
    "amp.enabled": "off: HF turns Apex AMP on only with --fp16 --fp16_backend apex",
    "amp.opt_level": "HF fp16_opt_level default 'O1'",
    "zero_optimization.reduce_bucket_size": "d_model**2, as HF",
    "zero_optimization.stage3_param_persistence_threshold": "10 * d_model, as HF",
}


def _d_model(data: dict) -> int:
    model = data.get("model") or {}
    if model.get("d_model"):
        return int(model["d_model"])
    from models import FAMILIES, PRESETS

    preset = model.get("preset")
    if preset in PRESETS:
        return int(PRESETS[preset]["d_model"])
    family = FAMILIES.get(model.get("family") or "gpt2")
    default = getattr(family[1], "d_model", None) if family and preset is None else None
    if isinstance(default, int):
        return default
    raise ConfigError("zero_optimization bucket sizes 'auto' are d_model-derived (HF: hidden_size); give "
                      "model.d_model or model.preset, or numbers for the 'auto' keys")


def _lr(data: dict, default_lr: float):
    if "optimizer" not in data:   # jzero's default optimizer section
        return default_lr
    lr = ((data.get("optimizer") or {}).get("params") or {}).get("lr", AUTO)
    return HF_DEFAULTS["learning_rate"] if lr == AUTO else lr


#: keys resolved before jzero.ds_keys' table applies (it refuses the feature they switch on unless it is off)
BEFORE_KEYS = ("amp.enabled", "amp.opt_level")


def _fill(data: dict, paths, value_for) -> list[tuple[str, Any]]:
    """Replace each ``"auto"`` at ``paths`` in ``data`` (in place) by ``value_for(path)`` (None: drop the key)."""
    filled: list[tuple[str, Any]] = []
    for path in paths:
        node = data
        *parents, last = path.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(last) == AUTO:
            value = value_for(path)
            if value is None:
                del node[last]
            else:
                node[last] = value
            filled.append((path, value))
    return filled


def resolve_auto_before_keys(data: dict) -> tuple[dict, list[tuple[str, Any]]]:
    """The ``"auto"`` values of :data:`BEFORE_KEYS` (Apex AMP's switch and level) resolved as HF does, before
    :func:`jzero.ds_keys.normalize` reads them: ``amp.enabled`` is false (HF: fp16 with the apex backend only),
    ``amp.opt_level`` HF's ``fp16_opt_level`` default. Returns the dict and ``[(key, value)]``."""
    data = copy.deepcopy(data)
    values = {"amp.enabled": False, "amp.opt_level": HF_DEFAULTS["fp16_opt_level"]}
    return data, _fill(data, BEFORE_KEYS, values.__getitem__)


def resolve_auto(data: dict, default_lr: float, default_steps: int) -> tuple[dict, list[tuple[str, Any]]]:
    """Replace every ``"auto"`` by HF's value (see the module doc); returns the dict and ``[(key, value)]``.
    ``default_lr`` / ``default_steps``: jzero's own defaults (``optimizer.params.lr``, ``train.steps``), for a
    config without those sections (jzero.config passes them: this module sits below the schema).
    :data:`BEFORE_KEYS` are :func:`resolve_auto_before_keys`' (called before the key table)."""
    data = copy.deepcopy(data)

    def value_for(path):
        if path in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            return None
        if path == "gradient_clipping":
            return HF_DEFAULTS["max_grad_norm"]
        if path == "optimizer.params.lr":
            return HF_DEFAULTS["learning_rate"]
        if path == "optimizer.params.betas":
            return [HF_DEFAULTS["adam_beta1"], HF_DEFAULTS["adam_beta2"]]
        if path == "optimizer.params.eps":
            return HF_DEFAULTS["adam_epsilon"]
        if path == "optimizer.params.weight_decay":
            return HF_DEFAULTS["weight_decay"]
        if path == "scheduler.params.warmup_min_lr":
            return 0
        if path == "scheduler.params.warmup_max_lr":
            return _lr(data, default_lr)
        if path == "scheduler.params.warmup_num_steps":
            return HF_DEFAULTS["warmup_steps"]
        if path == "scheduler.params.total_num_steps":
            return int((data.get("train") or {}).get("steps", default_steps))
        if path in ("fp16.enabled", "bf16.enabled"):
            return False
        d = _d_model(data)
        return {"zero_optimization.reduce_bucket_size": d * d,
                "zero_optimization.stage3_param_persistence_threshold": 10 * d}[path]

    filled = _fill(data, [p for p in RULES if p not in BEFORE_KEYS], value_for)
    batch = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    if any(k in batch for k, _ in filled) and not any(data.get(k) is not None for k in batch[:2]):
        key = next(k for k, _ in filled if k in batch)
        raise ConfigError(f"{key}='auto': HF fills the batch sizes from its --per_device_train_batch_size, which "
                          f"jzero does not have; give train_micro_batch_size_per_gpu or train_batch_size a number")
    left = _find_auto({k: v for k, v in data.items() if k not in JZERO_SECTIONS})
    if left:
        raise ConfigError(f"{left}='auto': jzero resolves 'auto' only where the Hugging Face integration "
                          f"derives it ({', '.join(sorted(RULES))}); give a value for {left}")
    return data, filled


def _find_auto(node, prefix: str = "") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_auto(v, f"{prefix}{k}.")
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _find_auto(v, f"{prefix}{i}.")
            if found:
                return found
    elif node == AUTO:
        return prefix[:-1]
    return None


def filled_line(filled: list[tuple[str, Any]]) -> str | None:
    """One line naming each resolved ``"auto"`` and its value (None when there were none)."""
    if not filled:
        return None
    parts = [f"{k}={'(derived)' if v is None else v!r} ({RULES[k]})" for k, v in filled]
    return "ds_config 'auto' values resolved as the Hugging Face integration does: " + "; ".join(parts)
