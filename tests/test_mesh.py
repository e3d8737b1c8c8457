"""jzero.mesh: meshes from the config's axis sizes, and a mesh given in code checked against the config."""
import pytest

import jzero
from jzero.config import load_config
from jzero.errors import ConfigError
from jzero.mesh import make_mesh

TINY = {"train_batch_size": 8, "model": {"preset": "gpt2-tiny"}, "data": {"seq_len": 16}}


def test_sizes_from_the_config_and_the_rest_to_minus_one():
    assert dict(make_mesh({"data": -1, "tensor": 2}).shape) == {"data": 4, "pipeline": 1, "tensor": 2}
    assert dict(make_mesh().shape) == {"data": 8, "pipeline": 1, "tensor": 1}


@pytest.mark.parametrize("sizes,message", [
    ({"dat": 4}, "unknown key 'mesh.dat' in mesh given in code: not a DeepSpeed or jzero key under mesh; did you "
                 "mean 'mesh.data'?"),
    ({"data": -1, "tensor": -1}, "mesh: more than one mesh axis is -1; give explicit sizes to all but one (mesh "
                                 "given in code)"),
])
def test_a_bad_dict_is_one_line(sizes, message):
    with pytest.raises(ConfigError) as e:
        make_mesh(sizes)
    assert str(e.value) == message


def test_initialize_refuses_a_mesh_unlike_the_configs():
    """A pipeline axis the config does not know of would stay unused (each stage doing all the work) while the
    run reports data=8: refused, naming both; a matching mesh is taken."""
    with pytest.raises(ConfigError) as e:
        jzero.initialize(load_config(base=TINY), mesh=make_mesh({"data": 4, "pipeline": 2}))
    assert str(e.value).startswith("the mesh given to initialize has pipeline=2, data=4, tensor=1 but the config's "
                                   "mesh is data=8, tensor=1, pipeline=1; set mesh.data/tensor/pipeline")
    cfg = load_config(base=TINY, overrides=["mesh.data=4", "mesh.tensor=2"])
    eng = jzero.initialize(cfg, mesh=make_mesh({"data": 4, "tensor": 2}))
    assert dict(eng.mesh.shape) == {"data": 4, "pipeline": 1, "tensor": 2}
