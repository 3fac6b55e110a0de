"""memopt's runtime ops (torch.library custom ops and their kernels). Importing this package
registers them, which loading a saved program needs before deserializing."""

import importlib

for _name in ("quant_ops", "moe_ops", "dfloat11", "kv_ops", "offload_ops"):
    try:
        importlib.import_module(f"memopt.runtime.{_name}")
    except ModuleNotFoundError as exc:  # an optional kernel module not present in this build
        if exc.name != f"memopt.runtime.{_name}":
            raise
