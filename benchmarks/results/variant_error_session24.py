"""decode_kernel_error.py's table with a Gluon variant file in place of the installed kernel:
python benchmarks/results/variant_error_session24.py VARIANT.py.txt [queries]."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ab_decode  # noqa: E402
import decode_kernel_error  # noqa: E402
from zipvl_compile.runtime import triton_decode  # noqa: E402

if sys.argv[1] != "installed":
    triton_decode._GLUON = ab_decode.load_variant("err", sys.argv[1])
sys.argv = sys.argv[:1] + sys.argv[2:]
decode_kernel_error.main()
