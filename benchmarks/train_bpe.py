"""A GPT-2-sized byte-level BPE (vocab 50257) trained on the Python stdlib's sources: ``python -m benchmarks.train_bpe OUT.json``.

The GPU machine cannot download GPT-2's tokenizer; this one gives the benchmark's prepared ``data.path`` a
realistic (Zipfian) token stream, which the byte-level corpus (~100 distinct ids) does not.
"""
import sysconfig, pathlib
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
files = sorted(str(p) for p in pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if "test" not in p.parts)[:1500]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
def texts():
    for f in files:
        yield pathlib.Path(f).read_bytes().decode("utf-8", "replace")
tok.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=50257, special_tokens=["<|endoftext|>"], show_progress=False,
                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
import sys
out = sys.argv[1] if len(sys.argv) > 1 else "bpe50k.json"
tok.save(out)
print(tok.get_vocab_size())
