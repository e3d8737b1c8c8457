"""The public ``import jzero`` API as README.md shows it: what each call takes, and one-line errors for what it
does not (never an AttributeError from deep inside)."""
import json

import pytest

import jzero
from jzero.errors import ConfigError

TINY = {"train_batch_size": 8, "model": {"n_layer": 1, "d_model": 32, "n_head": 2, "d_ff": 64},
        "data": {"seq_len": 16}}


def test_initialize_takes_a_config_path_or_dict_as_deepspeed_does(tmp_path):
    """deepspeed.initialize(config=) takes a path or a dict; jzero.initialize("ds_config.json") used to fail with
    "AttributeError: 'str' object has no attribute 'mesh'"."""
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(TINY))
    for config in (str(path), path, TINY):
        eng = jzero.initialize(config, abstract=True)   # abstract: nothing allocated, nothing compiled
        assert eng.batch_shape() == (1, 8, 17) and eng.config.model.d_model == 32
    with pytest.raises(ConfigError, match=r"^initialize: config has type int; pass jzero.load_config\(PATH_OR_DICT\)"):
        jzero.initialize(3)


def test_load_config_refuses_one_string_of_overrides():
    """load_config(path, "a=b") iterated the string: "override 'z' is not key=value"; now it names the fix."""
    with pytest.raises(ConfigError) as e:
        jzero.load_config(TINY, "zero_optimization.stage=3")
    assert str(e.value) == ("load_config: overrides='zero_optimization.stage=3' is one string; pass a list of "
                            "key=value strings, e.g. ['zero_optimization.stage=3']")


def test_make_mesh_names_what_it_takes():
    """jzero.make_mesh((1, 8, 1)) (jax.make_mesh's habit) was "AttributeError: 'tuple' object has no attribute
    'data'"; sizes by axis name, a config's .mesh or None are what it takes."""
    assert dict(jzero.make_mesh({"data": 4, "tensor": 2}).shape) == {"pipeline": 1, "data": 4, "tensor": 2}
    assert dict(jzero.make_mesh(jzero.load_config(TINY).mesh).shape)["data"] == 8
    with pytest.raises(ConfigError, match=r"^make_mesh: mesh_cfg=\(1, 8, 1\) has type tuple; pass sizes by axis name, "
                                          r"e.g. \{'data': 4, 'tensor': 2\}"):
        jzero.make_mesh((1, 8, 1))
