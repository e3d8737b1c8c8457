"""benchmarks.autotune_diff: choices keyed by HLO, measured times ignored, differing choices counted."""

from benchmarks.autotune_diff import entries, main

A = '''version: 3
results {
  device: "CUDA: 9.0, Cores: 132"
  hlo: "gemm_a"
  result {
    gemm { algorithm: 5 }
    run_time { nanos: 1234 }
  }
}
results {
  device: "CUDA: 9.0, Cores: 132"
  hlo: "fusion_b"
  result {
    triton { block_m: 64 }
    run_time {
      nanos: 99
    }
  }
}
'''


def test_times_ignored_choices_compared(tmp_path, capsys):
    b = A.replace("nanos: 1234", "nanos: 777")            # same choices, other times
    c = A.replace("algorithm: 5", "algorithm: 7")         # one choice differs
    assert entries(A) == entries(b)
    assert entries(A) != entries(c) and len(entries(c)) == 2
    paths = []
    for name, text in (("a", A), ("b", b), ("c", c)):
        p = tmp_path / f"{name}.textproto"
        p.write_text(text)
        paths.append(str(p))
    main(paths)
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("2 entries, 2 shared with " + paths[0] + ", 0 choices differ")
    assert out[1].endswith("0 choices differ")
    assert out[2].endswith("1 choices differ")


NEW = '''entries {
  key {
    target {
      device: "699b92c0fb30cb16"
      hlo_fingerprint: "01ee"
    }
    environment {
      codegen_version: "fe90"
    }
  }
  value {
    optimal_config {
      backend: CUBLASLT_FISSION
      backend_config {
        gemm {
          algorithm: 7
        }
      }
    }
  }
}
entries {
  key {
    target {
      device: "699b92c0fb30cb16"
      hlo_fingerprint: "05ff"
    }
  }
  value {
    optimal_config {
      backend: NATIVE_EMITTER
    }
  }
}
'''


def test_jax_011_entries_format():
    a = entries(NEW)
    assert sorted(a) == ["699b92c0fb30cb16|01ee", "699b92c0fb30cb16|05ff"]
    assert "algorithm: 7" in a["699b92c0fb30cb16|01ee"]
    b = entries(NEW.replace("algorithm: 7", "algorithm: 3"))
    assert [k for k in a if a[k] != b[k]] == ["699b92c0fb30cb16|01ee"]
