"""jzero.liveness: which peers count as dead (the two-process kill is in tests/test_distributed.py)."""
from jzero.liveness import Watcher


class FakeKV:
    """The two calls Watcher makes on JAX's DistributedRuntimeClient."""

    def __init__(self):
        self.kv = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        self.kv[key] = value

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def test_a_peer_is_dead_only_after_its_counter_stood_still_for_the_window():
    kv = FakeKV()
    w = Watcher(kv, process_id=0, num_processes=3, stale_after_s=4.0)
    w.beat()
    assert kv.kv == {"jzero/alive/0": "1"}
    assert w.dead_peer(0.0) is None                      # peers 1, 2 not beating yet: still starting, not dead
    kv.kv["jzero/alive/1"] = "1"
    assert w.dead_peer(1.0) is None and w.dead_peer(4.5) is None   # first seen at 1.0: 3.5 s silent
    assert w.dead_peer(5.0) == (1, 4.0)                  # 4 s without a new beat
    kv.kv["jzero/alive/1"] = "2"
    assert w.dead_peer(6.0) is None                      # it beat again: the window restarts
    kv.kv["jzero/alive/1"] = "done"
    assert w.dead_peer(60.0) is None                     # it ended on purpose
    w.stop()
    assert kv.kv["jzero/alive/0"] == "done"
    assert Watcher(kv, 0, 2, stale_after_s=0.1).stale_after_s == 3.0   # never below 3 beat intervals
