"""benchmarks/decode_attention.py with launch settings of ``triton_decode`` changed first:
python benchmarks/results/decode_attention_settings_session24.py "NAME=VALUE;NAME=VALUE" [args]
(values as Python literals; the rest of the arguments go to decode_attention.py)."""
import ast
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import decode_attention  # noqa: E402
from zipvl_compile.runtime import triton_decode  # noqa: E402

for item in sys.argv[1].split(";"):
    key, _, value = item.partition("=")
    assert hasattr(triton_decode, key), key
    setattr(triton_decode, key, ast.literal_eval(value))
    print(f"setting {key} = {getattr(triton_decode, key)}")
sys.argv = sys.argv[:1] + sys.argv[2:]
decode_attention.main()
