"""jzero: DeepSpeed's training engine on JAX/XLA.

    import jzero
    engine = jzero.initialize(jzero.load_config("ds_config.json"))
    from jzero import sharding, mesh          # the sharding utilities, importable on their own
    out = jzero.generate([[15496, 11]], hf="gpt2_dir", max_new_tokens=16)   # KV-cache decoding (jzero.generation)
"""

__version__ = "0.1.0"

_LAZY = {
    "initialize": ("jzero.engine", "initialize"),
    "Engine": ("jzero.engine", "Engine"),
    "TrainState": ("jzero.step", "TrainState"),
    "load_config": ("jzero.config", "load_config"),
    "make_mesh": ("jzero.mesh", "make_mesh"),
    "generate": ("jzero.generation", "generate"),
    "Generator": ("jzero.generation", "Generator"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'jzero' has no attribute '{name}'")


__all__ = list(_LAZY)
