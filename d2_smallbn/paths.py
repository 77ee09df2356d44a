"""One rule for every command: nothing a command is given is overwritten.

``check_output_paths(outputs, inputs)`` refuses, before anything is written, an output path that
is one of the inputs, lies inside an input folder, or is a folder holding an input, and two outputs
that are one file. Paths are compared after resolving ``~``, relative paths and symbolic links.
Each command passes its own error class (called as ``error(path, problem, fix)``), so the refusal
reads like its other one-line errors; the default, ``OutputPathError``, is a ``ValueError``.
"""
import os


class OutputPathError(ValueError):
    """An output path that would overwrite an input; ``str()`` is one line: path, problem, fix."""

    def __init__(self, path, problem, fix):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}")


def resolved(path):
    """The absolute path with ``~`` expanded and symbolic links resolved."""
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def same_path(a, b):
    """True when ``a`` and ``b`` name one file or folder (also through links or relative paths)."""
    try:
        return os.path.samefile(os.path.expanduser(os.fspath(a)), os.path.expanduser(os.fspath(b)))
    except OSError:  # one of them does not exist (yet)
        return resolved(a) == resolved(b)


def lies_inside(path, folder):
    """True when ``path`` lies strictly inside ``folder``."""
    path, folder = resolved(path), resolved(folder)
    return path != folder and os.path.commonpath([path, folder]) == folder


def clash(output, output_role, input_path, input_role):
    """``(problem, fix)`` when writing ``output`` can overwrite ``input_path``, else None."""
    if same_path(output, input_path):
        return (f"the {output_role} is the {input_role} {input_path}: writing it would destroy the {input_role}",
                f"pass another {output_role} path")
    if lies_inside(input_path, output):
        return (f"the {output_role} is a folder holding the {input_role} {input_path}: writing into it could "
                f"overwrite the {input_role}", f"pass another {output_role}, one that does not hold {input_path}")
    if lies_inside(output, input_path):
        return (f"the {output_role} lies inside the {input_role} {input_path}: outputs and inputs must stay apart",
                f"pass another {output_role}, outside {input_path}")
    return None


def check_output_paths(outputs, inputs, error=OutputPathError):
    """Raises ``error(path, problem, fix)`` for the first output that clashes with an input, or two
    outputs that are one file. ``outputs`` and ``inputs`` are ``(role, path)`` pairs, the role
    naming the path in the message (e.g. ``("--output", "summary.json")``, ``("results file", p)``);
    a None path is skipped."""
    outputs = [(role, path) for role, path in outputs if path is not None]
    inputs = [(role, path) for role, path in inputs if path is not None]
    for output_role, output in outputs:
        for input_role, input_path in inputs:
            problem = clash(output, output_role, input_path, input_role)
            if problem:
                raise error(output, *problem)
    for i, (role_a, a) in enumerate(outputs):
        for role_b, b in outputs[i + 1:]:
            if same_path(a, b):
                raise error(b, f"the {role_b} is the {role_a} {a}: one would replace the other",
                            f"pass different paths for the {role_a} and the {role_b}")
