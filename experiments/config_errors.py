"""A wrong config value said in one line: the key, the value and what was expected.

jsonargparse reports a bad value deep in a run config as a nested dump of every type it tried
(the model's class, then None; the optimiser's class, then None; ...) under the whole usage of
`medsd fit`, some hundred lines in which the one that matters is hard to find. `one_line`
reduces that dump to its leaves, named by their dotted key; `MedsdArgumentParser` prints it so.
An error raised while a class is built from the config (a missing VAE folder) reaches jsonargparse
the same way, wrapped in the same dump; `original_error` unwraps it.
"""

from __future__ import annotations

import re
import sys

from lightning.pytorch.cli import LightningArgumentParser

UNION_FAILED = "Does not validate against any of the Union subtypes"
# Lines of the dump that only say how it is nested.
STRUCTURE = (UNION_FAILED, "Subtypes:", "Errors:", "Given value type:", "Given value:")
KEY = re.compile(r'Parser key "([^"]+)":')
CLASS = re.compile(r"Problem with given class_path '([^']+)':")
EXPECTED = re.compile(r"Expected a <class '([^']+)'>(?:\. Got value: (.*))?")


def one_line(message: str) -> str:
    """`model.init_args.optimizer.init_args.lr: expected float, got 'abc'` from jsonargparse's dump."""
    if not KEY.search(message):  # not nested: its lines joined
        return " ".join(message.split())
    path: list[tuple[int, str]] = []  # (indent, key part) of the branch the line is in
    leaves: list[str] = []
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ")
        indent = len(raw) - len(raw.lstrip(" -"))
        if not line or line.startswith(STRUCTURE):
            continue
        path = [(i, part) for i, part in path if i < indent]
        if key := KEY.fullmatch(line):
            path.append((indent, key.group(1)))
        elif CLASS.fullmatch(line):
            path.append((indent, "init_args"))
        elif not (expected := EXPECTED.fullmatch(line)) or expected.group(1) != "NoneType":
            if expected:
                got = f", got {expected.group(2)!r}" if expected.group(2) is not None else ""
                line = f"expected {expected.group(1)}{got}"
            # A trailing init_args is the class itself failing (its __init__ raised).
            keys = ".".join(part for _, part in path).removesuffix(".init_args")
            leaves.append(f"{keys}: {line}" if keys else line)
    return "; ".join(dict.fromkeys(leaves))


def original_error(error: BaseException) -> BaseException:
    """The exception a class raised while jsonargparse built it, out of the union errors that
    jsonargparse wraps it in (each raised `from` the one before)."""
    while str(error).startswith(UNION_FAILED) and error.__cause__ is not None:
        error = error.__cause__
    return error


class MedsdArgumentParser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {one_line(message)}\n(`{prog} --help` lists the options)\n")
        self.exit(2)
