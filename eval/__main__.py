"""``python -m eval COMMAND [args ...]`` — one entry for every evaluation; ``python -m eval COMMAND --help``.

    verification   .bin pair sets (LFW, CFP-FP, AgeDB-30, ...): 10-fold accuracy       (eval.verification)
    ijb            IJB-B / IJB-C 1:1 TAR@FAR and 1:N identification                   (eval.ijb)
    megaface       MegaFace challenge 1: rank-1 and TAR@FAR=1e-6 against 1M distractors (eval.megaface)
    onnx           ONNX export + onnxruntime comparison + MFR-style self-check         (eval.onnx_export)
    tables         paper tables: several runs' results beside the published numbers   (eval.tables)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "verification": "eval.verification",
    "ijb": "eval.ijb",
    "megaface": "eval.megaface",
    "onnx": "eval.onnx_export",
    "tables": "eval.tables",
}


def main(argv: list[str] | None = None) -> object:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}")
        return None
    module = importlib.import_module(COMMANDS[argv[0]])
    sys.argv[0] = f"python -m eval {argv[0]}"
    return module.main(argv[1:])


if __name__ == "__main__":
    result = main()
    from runtime.process import exit_process  # the process group a launcher made, torn down cleanly

    exit_process(result if isinstance(result, int) else 0)
